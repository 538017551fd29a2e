// Minimal vcsim entrypoint built against Debian's govmomi 0.24 simulator package.
// Adapted for fleetwright's test environment: besides the recipe's flags it serves
// GET/PUT /fleetwright/delay to read or replace the SOAP delay configuration at runtime
// (fault injection without a restart, which would lose the in-memory inventory).
package main

import (
	"crypto/tls"
	"encoding/json"
	"net/http"
	"sync"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	_ "github.com/vmware/govmomi/lookup/simulator"
	_ "github.com/vmware/govmomi/pbm/simulator"
	_ "github.com/vmware/govmomi/sts/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator"
)

func main() {
	m := simulator.VPX()
	listen := flag.String("l", "127.0.0.1:8989", "listen address")
	useTLS := flag.Bool("tls", true, "enable TLS (self-signed)")
	esx := flag.Bool("esx", false, "simulate standalone ESX instead of vCenter")
	user := flag.String("username", "user", "login username")
	pass := flag.String("password", "pass", "login password")
	flag.IntVar(&m.Datacenter, "dc", m.Datacenter, "datacenters")
	flag.IntVar(&m.Cluster, "cluster", m.Cluster, "clusters per DC")
	flag.IntVar(&m.ClusterHost, "host", m.ClusterHost, "hosts per cluster")
	flag.IntVar(&m.Host, "standalone-host", m.Host, "standalone hosts per DC")
	flag.IntVar(&m.Pool, "pool", m.Pool, "resource pools per cluster")
	flag.IntVar(&m.Datastore, "ds", m.Datastore, "datastores")
	flag.IntVar(&m.Machine, "vm", m.Machine, "VMs per resource pool")
	flag.IntVar(&m.Folder, "folder", m.Folder, "folders")
	flag.IntVar(&m.Portgroup, "pg", m.Portgroup, "DV portgroups")
	flag.BoolVar(&m.Autostart, "autostart", true, "power on model VMs")
	flag.IntVar(&m.DelayConfig.Delay, "delay", 0, "ms delay per SOAP call")
	flag.Float64Var(&m.DelayConfig.DelayJitter, "delay-jitter", 0, "delay jitter (stddev/mean)")
	methodDelay := flag.String("method-delay", "", "per-method delay, e.g. CloneVM_Task:500,PowerOnVM_Task:200")
	flag.Parse()
	if *esx {
		m = simulator.ESX()
	}
	if *methodDelay != "" {
		m.DelayConfig.MethodDelay = map[string]int{}
		var name string
		var ms int
		for _, kv := range splitComma(*methodDelay) {
			if _, err := fmt.Sscanf(kv, "%[^:]:%d", &name, &ms); err == nil {
				m.DelayConfig.MethodDelay[name] = ms
			} else {
				// Sscanf has no %[ ; fallback manual parse
				for i := len(kv) - 1; i >= 0; i-- {
					if kv[i] == ':' {
						fmt.Sscanf(kv[i+1:], "%d", &ms)
						m.DelayConfig.MethodDelay[kv[:i]] = ms
						break
					}
				}
			}
		}
	}
	if err := m.Create(); err != nil {
		log.Fatal(err)
	}
	m.Service.RegisterEndpoints = true
	var mu sync.Mutex
	m.Service.HandleFunc("/fleetwright/delay", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if r.Method == http.MethodPut || r.Method == http.MethodPost {
			var in struct {
				Delay       int            `json:"delay"`
				MethodDelay map[string]int `json:"method_delay"`
			}
			if err := json.NewDecoder(r.Body).Decode(&in); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			// replace (never mutate) the map: SOAP handlers read it concurrently
			m.DelayConfig.MethodDelay = in.MethodDelay
			m.DelayConfig.Delay = in.Delay
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]interface{}{
			"delay": m.DelayConfig.Delay, "method_delay": m.DelayConfig.MethodDelay,
		})
	})
	m.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *pass)}
	if *useTLS {
		m.Service.TLS = new(tls.Config)
	}
	s := m.Service.NewServer()
	fmt.Printf("export GOVC_URL=%s GOVC_SIM_PID=%d\n", s.URL, os.Getpid())
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGINT, syscall.SIGTERM)
	<-c
	s.Close()
	m.Remove()
}

func splitComma(s string) []string {
	var out []string
	start := 0
	for i := 0; i <= len(s); i++ {
		if i == len(s) || s[i] == ',' {
			if i > start {
				out = append(out, s[start:i])
			}
			start = i + 1
		}
	}
	return out
}
