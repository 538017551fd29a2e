#!/usr/bin/python3
"""fw_files: directories, small files and removals in ONE module run (one SSH round trip).

Ansible's ``copy``/``file`` cost one or two module runs per file; the playbooks write a dozen
small files per host, so this module does them together, idempotently:

    fw_files:
      absent: [/etc/fleetwright/pki, /etc/fleetwright/cluster]   # removed first, in order
      dirs: [{path: /etc/fleetwright/pki, mode: "0700"}]
      files: [{path: /etc/fleetwright/cluster, content: "c1\n", mode: "0644"}]

Only what differs is touched (content and mode compared); ``changed`` and ``changed_paths``
report it. Files are written atomically (temp file + rename). Use ``no_log`` for secrets.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile

from ansible.module_utils.basic import AnsibleModule


def _mode(m) -> int:
    return int(str(m), 8)


def main() -> None:
    module = AnsibleModule(argument_spec={
        "absent": {"type": "list", "elements": "str", "default": []},
        "dirs": {"type": "list", "elements": "dict", "default": []},
        "files": {"type": "list", "elements": "dict", "default": []},
    }, supports_check_mode=True)
    p = module.params
    changed: list[str] = []
    check = module.check_mode
    try:
        for path in p["absent"]:
            if os.path.islink(path) or os.path.isfile(path):
                changed.append(path)
                if not check:
                    os.unlink(path)
            elif os.path.isdir(path):
                changed.append(path)
                if not check:
                    shutil.rmtree(path)
        for d in p["dirs"]:
            path, mode = d["path"], _mode(d.get("mode", "0755"))
            if not os.path.isdir(path):
                changed.append(path)
                if not check:
                    os.makedirs(path, exist_ok=True)
                    os.chmod(path, mode)
            elif stat.S_IMODE(os.stat(path).st_mode) != mode:
                changed.append(path)
                if not check:
                    os.chmod(path, mode)
        for f in p["files"]:
            path, mode, content = f["path"], _mode(f.get("mode", "0644")), f.get("content", "").encode()
            try:
                with open(path, "rb") as fh:
                    same = fh.read() == content
                same_mode = stat.S_IMODE(os.stat(path).st_mode) == mode
            except OSError:
                same, same_mode = False, False
            if same and same_mode:
                continue
            changed.append(path)
            if check:
                continue
            if same:
                os.chmod(path, mode)
                continue
            parent = os.path.dirname(path) or "."
            os.makedirs(parent, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".fw-")
            try:
                os.write(fd, content)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            os.replace(tmp, path)
    except OSError as e:
        module.fail_json(msg=f"fw_files: {e}", changed_paths=changed)
    module.exit_json(changed=bool(changed), changed_paths=changed)


if __name__ == "__main__":
    main()
