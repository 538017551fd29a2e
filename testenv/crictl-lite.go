// crictl-lite: a stand-in for cri-tools' crictl (not packaged in Debian 12) for the test machines.
//
// It implements only the sub-commands kubeadm v1.20/v1.21 and the playbooks run -- info, version,
// pods [-q], stopp, rmp, inspecti, pull, images -- over the real CRI gRPC API, using the CRI client
// vendored in the Kubernetes tree (testenv/kube.py compiles it there as cmd/crictl).
package main

import (
	"fmt"
	"os"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1alpha2"
	"k8s.io/kubernetes/pkg/kubelet/cri/remote"
)

func die(err error) {
	fmt.Fprintln(os.Stderr, "crictl-lite:", err)
	os.Exit(1)
}

func main() {
	args := os.Args[1:]
	ep := "unix:///run/containerd/containerd.sock"
	for len(args) > 1 && (args[0] == "-r" || args[0] == "--runtime-endpoint" || args[0] == "-i" || args[0] == "--image-endpoint") {
		ep, args = args[1], args[2:]
	}
	if len(args) == 0 {
		die(fmt.Errorf("usage: crictl [-r ENDPOINT] info|version|pods|stopp|rmp|inspecti|pull|images"))
	}
	cmd, rest := args[0], args[1:]
	var ids []string
	for _, a := range rest {
		if len(a) > 0 && a[0] != '-' {
			ids = append(ids, a)
		}
	}
	timeout := 2 * time.Minute
	switch cmd {
	case "info", "version":
		rs, err := remote.NewRemoteRuntimeService(ep, timeout)
		if err != nil {
			die(err)
		}
		v, err := rs.Version("v1alpha2")
		if err != nil {
			die(err)
		}
		fmt.Printf("RuntimeName: %s\nRuntimeVersion: %s\nRuntimeApiVersion: %s\n", v.RuntimeName, v.RuntimeVersion, v.RuntimeApiVersion)
		if cmd == "info" {
			st, err := rs.Status()
			if err != nil {
				die(err)
			}
			for _, c := range st.Conditions {
				fmt.Printf("%s=%v %s\n", c.Type, c.Status, c.Message)
			}
		}
	case "pods", "stopp", "rmp":
		rs, err := remote.NewRemoteRuntimeService(ep, timeout)
		if err != nil {
			die(err)
		}
		if cmd == "pods" {
			l, err := rs.ListPodSandbox(nil)
			if err != nil {
				die(err)
			}
			for _, p := range l {
				fmt.Println(p.Id)
			}
			return
		}
		for _, id := range ids {
			if cmd == "stopp" {
				err = rs.StopPodSandbox(id)
			} else {
				err = rs.RemovePodSandbox(id)
			}
			if err != nil {
				die(err)
			}
			fmt.Println(id)
		}
	case "inspecti", "pull", "images":
		is, err := remote.NewRemoteImageService(ep, timeout)
		if err != nil {
			die(err)
		}
		if cmd == "images" {
			l, err := is.ListImages(nil)
			if err != nil {
				die(err)
			}
			for _, i := range l {
				for _, t := range i.RepoTags {
					fmt.Println(t)
				}
			}
			return
		}
		for _, id := range ids {
			spec := &runtimeapi.ImageSpec{Image: id}
			if cmd == "inspecti" {
				s, err := is.ImageStatus(spec)
				if err != nil {
					die(err)
				}
				if s == nil {
					die(fmt.Errorf("no such image %q present", id))
				}
				fmt.Println(s.Id)
			} else {
				ref, err := is.PullImage(spec, nil, nil)
				if err != nil {
					die(err)
				}
				fmt.Println("Image is up to date for", ref)
			}
		}
	default:
		die(fmt.Errorf("unsupported command %q", cmd))
	}
}
