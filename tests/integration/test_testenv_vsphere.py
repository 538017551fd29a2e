"""The test environment's vSphere (govmomi vcsim), exercised over the wire with pyvmomi."""
from __future__ import annotations

import secrets
import time

import pytest
from pyVim.connect import Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from testenv import vcsim


@pytest.fixture(scope="module")
def si(vsphere_env):
    s = vcsim.connect(vsphere_env)
    yield s
    Disconnect(s)


def _by_path(si, path):
    return si.RetrieveContent().searchIndex.FindByInventoryPath(path)


def _find(si, kind, name):
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        return next((o for o in view.view if o.name == name), None)
    finally:
        view.Destroy()


def _clone(si, env, name):
    tpl = _by_path(si, env["template_path"])
    folder = _by_path(si, env["folder_path"])
    pool = _by_path(si, env["resource_pool"])
    ds = _find(si, vim.Datastore, env["datastore"])
    task = tpl.CloneVM_Task(folder=folder, name=name, spec=vim.vm.CloneSpec(
        location=vim.vm.RelocateSpec(pool=pool, datastore=ds), powerOn=False, template=False))
    WaitForTask(task)
    return task.info.result


def test_inventory_is_prepared(si, vsphere_env):
    content = si.RetrieveContent()
    assert content.about.apiType == "VirtualCenter"
    dc = _by_path(si, vsphere_env["datacenter"])
    assert isinstance(dc, vim.Datacenter)
    assert isinstance(_by_path(si, f"{vsphere_env['datacenter']}/host/{vsphere_env['cluster']}"),
                      vim.ClusterComputeResource)
    assert isinstance(_by_path(si, vsphere_env["folder_path"]), vim.Folder)
    assert isinstance(_by_path(si, vsphere_env["resource_pool"]), vim.ResourcePool)
    assert vsphere_env["datastore"] in [d.name for d in dc.datastore]
    assert vsphere_env["network"] in [n.name for n in dc.network]
    tpl = _by_path(si, vsphere_env["template_path"])
    assert tpl.name == vsphere_env["template"] and tpl.config.template is True
    assert tpl.runtime.powerState == vim.VirtualMachinePowerState.poweredOff


def test_clone_power_on_custom_attribute_destroy(si, vsphere_env):
    name = f"fw-test-{secrets.token_hex(3)}"
    vm = _clone(si, vsphere_env, name)
    try:
        assert vm.parent.name == vsphere_env["folder"]
        assert vm.config.template is False
        # vcsim ignores a ConfigSpec in the CloneSpec: reconfigure afterwards
        WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(numCPUs=4, memoryMB=8192, extraConfig=[
            vim.option.OptionValue(key="guestinfo.fleetwright", value="node")])))
        assert (vm.config.hardware.numCPU, vm.config.hardware.memoryMB) == (4, 8192)
        WaitForTask(vm.PowerOnVM_Task())
        assert vm.runtime.powerState == vim.VirtualMachinePowerState.poweredOn

        cfm = si.RetrieveContent().customFieldsManager
        key = f"fw-cluster-{secrets.token_hex(2)}"
        fd = cfm.AddCustomFieldDef(name=key, moType=vim.VirtualMachine)
        vm.setCustomValue(key, "prod-eu-1")
        assert [(v.key, v.value) for v in vm.customValue if v.key == fd.key] == [(fd.key, "prod-eu-1")]
        assert _by_path(si, f"{vsphere_env['folder_path']}/{name}") == vm
    finally:
        if vm.runtime.powerState == vim.VirtualMachinePowerState.poweredOn:
            WaitForTask(vm.PowerOffVM_Task())
        WaitForTask(vm.Destroy_Task())
    assert _by_path(si, f"{vsphere_env['folder_path']}/{name}") is None


def test_method_delay_fault_slows_the_call(si, vsphere_env, testenv_config):
    tpl = _by_path(si, vsphere_env["template_path"])

    def timed_clone() -> float:
        t0 = time.monotonic()
        vm = _clone(si, vsphere_env, f"fw-delay-{secrets.token_hex(3)}")
        elapsed = time.monotonic() - t0
        WaitForTask(vm.Destroy_Task())
        return elapsed

    # a delay far above what a loaded machine adds by itself, so no bound below is a sub-second bet
    delay = 8.0
    with vcsim.method_delay(testenv_config, CloneVM_Task=int(delay * 1000)):
        assert vcsim.get_delay(testenv_config)["method_delay"] == {"CloneVM_Task": int(delay * 1000)}
        slow = timed_clone()
        t0 = time.monotonic()
        assert tpl.name  # other methods are not delayed
        other = time.monotonic() - t0
    assert vcsim.get_delay(testenv_config)["method_delay"] in ({}, None)
    assert slow >= delay, slow  # the clone waited at least the delay
    assert other < delay / 2, other  # a property read did not
    assert timed_clone() < delay / 2  # and once the delay is gone, clones are quick again
