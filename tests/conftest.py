"""Shared pytest setup: the test environment's fixtures live in testenv.pytest_plugin.

Parallel runs (``pytest -n N --dist loadgroup``, as ``make test`` does): every test module is
one xdist group, so its module fixtures are built once on one worker; the modules that use the
fixed on-prem loopback addresses (SSH hosts, vSphere VMs, the demo's fleet) share one group and
so run one after another on one worker. Each worker has its own test-environment state dir
(see ``testenv.pytest_plugin``), so moto resets and apiservers never cross workers.
"""
import pytest

pytest_plugins = ["testenv.pytest_plugin"]

# modules whose tests bind fixed addresses on 127.0.1.0/24 or run the example fleet's on-prem clusters
ONPREM_MODULES = {
    "test_backend_metal", "test_backend_vsphere", "test_flows_onprem", "test_demo", "test_testenv_hosts",
    "test_testenv_vsphere", "test_testenv_lifecycle",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
        if module.startswith("test_crash") or module in ONPREM_MODULES or "onprem" in module:
            group = "onprem"
        else:
            group = module
        item.add_marker(pytest.mark.xdist_group(group))
