#!/usr/bin/env bash
# make test: three pytest sessions side by side, each with its own test-environment state dir.
#  - on-prem: the modules that bind fixed loopback addresses (SSH hosts, vSphere VMs, the demo's
#    fleet) run one after another in one session;
#  - machines: the modules that boot nspawn machines on the fwbr0 bridge (10.250.0.0/24: one set
#    at a time) run one after another in a session of their own; they wait on kubeadm and image
#    imports more than on the CPU, so they overlap well with the others;
#  - the rest runs in parallel workers (--dist loadfile: a module's fixtures are built once).
# Extra pytest arguments are passed to all three. Exit status: non-zero when any session failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
WORKERS=${TEST_WORKERS:-2}
# test_demo first: it starts a test environment of its own, with SSH hosts at the addresses the
# session's shared ssh_hosts fixture (test_flows_onprem, test_testenv_hosts) then keeps for the session
ONPREM=(tests/integration/test_demo.py tests/integration/test_backend_metal.py tests/integration/test_backend_vsphere.py
        tests/integration/test_vsphere_fleet_onprem.py tests/integration/test_flows_onprem.py
        tests/integration/test_crash_onprem.py tests/integration/test_retry_same_run_onprem.py
        tests/integration/test_git_ssh_onprem.py
        tests/integration/test_testenv_hosts.py tests/integration/test_testenv_vsphere.py
        tests/integration/test_testenv_lifecycle.py)
MACHINES=(tests/integration/test_testenv_machines.py tests/integration/test_metal_kubeadm.py
          tests/integration/test_vsphere_kubeadm.py)
ignore=(); for m in "${ONPREM[@]}" "${MACHINES[@]}"; do ignore+=(--ignore="$m"); done
# the heavy tests (long kill tests, dead workers) run with FLEETWRIGHT_TEST_HEAVY=1 (make test-heavy)
if [ -z "${FLEETWRIGHT_TEST_HEAVY:-}" ]; then set -- -m "not heavy" "$@"; fi
base=${FLEETWRIGHT_TESTENV_DIR:-/tmp/fleetwright-testenv}
log=$(mktemp -d)/onprem.log
# every cached build first (Kubernetes from source: ~13 min cold), outside any test's timeout
t0=$(date +%s)
.venv/bin/fleetwright testenv build > "$(dirname "$log")/build.json" || { echo "testenv build failed"; exit 1; }
echo "testenv build: $(( $(date +%s) - t0 )) s ($(tr -d ' \n' < "$(dirname "$log")/build.json"))"
FLEETWRIGHT_TESTENV_DIR="$base-onprem" $PY -m pytest -p no:cacheprovider "${ONPREM[@]}" "$@" > "$log" 2>&1 &
onprem=$!
machines_log=$(dirname "$log")/machines.log
FLEETWRIGHT_TESTENV_DIR="$base-machines" $PY -m pytest -p no:cacheprovider "${MACHINES[@]}" "$@" > "$machines_log" 2>&1 &
machines=$!
main_log=$(dirname "$log")/main.log
FLEETWRIGHT_TESTENV_DIR="$base-main" $PY -m pytest -p no:cacheprovider -n "$WORKERS" --dist loadfile "${ignore[@]}" "$@" \
  2>&1 | tee "$main_log"
rc_main=${PIPESTATUS[0]}
wait "$onprem"; rc_onprem=$?
wait "$machines"; rc_machines=$?
echo; echo "================ on-prem session ================"; cat "$log"
echo; echo "================ machines session ================"; cat "$machines_log"
# one closing line for both sessions (the last "N passed" summary of each log)
sum() { local n=0 f v; for f in "$main_log" "$log" "$machines_log"; do
  v=$(grep -E "[0-9]+ $1" "$f" | tail -1 | grep -Eo "[0-9]+ $1" | grep -Eo "^[0-9]+"); n=$((n + ${v:-0})); done; echo $n; }
echo "exit codes: main=$rc_main on-prem=$rc_onprem machines=$rc_machines"
echo "fleetwright: $(sum passed) passed, $(( $(sum failed) + $(sum error) )) failed"
[ "$rc_main" -eq 0 ] && [ "$rc_onprem" -eq 0 ] && [ "$rc_machines" -eq 0 ]
