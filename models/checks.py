"""Semantic checks over the whole catalogue: references, uniqueness, and that every cluster resolves."""
from __future__ import annotations

from . import maintenance
from .errors import Problem
from .catalogue import Definitions, DocRef, Locator
from .resolve import Resolver, check_variable


def check(defs: Definitions, loc: Locator) -> list[Problem]:
    out: list[Problem] = []

    def at(key: tuple, path: tuple, message: str) -> None:
        ref = defs.refs.get(key) or DocRef("<unknown>", 0)
        line, p = loc.locate(ref, path)
        out.append(Problem(ref.file, line, p, message))

    for cname, comp in defs.components.items():
        key = ("Component", cname)
        for i, dep in enumerate(comp.spec.depends_on):
            if dep not in defs.components:
                at(key, ("spec", "dependsOn", i), f"no Component {dep!r}")
        src = comp.spec.source
        for where, s in [(("spec", "source"), src)] + [(("spec", "backends", b, "source"), impl.source)
                                                       for b, impl in comp.spec.backends.items() if impl.source]:
            n = sum(x is not None for x in (s.manifests, s.helm, s.eks_addon))
            if n != 1:
                at(key, where, f"must set exactly one of manifests, helm, eksAddon (found {n})")

    for mname, versions in defs.models.items():
        for ver, model in versions.items():
            key = ("ClusterModel", mname, ver)
            seen = set()
            for i, v in enumerate(model.spec.variables):
                if v.name in seen:
                    at(key, ("spec", "variables", i, "name"), f"duplicate variable {v.name!r}")
                seen.add(v.name)
                if v.default is not None:
                    err = check_variable(v, v.default)
                    if err:
                        at(key, ("spec", "variables", i, "default"), err)
            pools = set()
            for i, p in enumerate(model.spec.node_pools):
                if p.name in pools:
                    at(key, ("spec", "nodePools", i, "name"), f"duplicate node pool {p.name!r}")
                pools.add(p.name)
                if isinstance(p.min_size, int) and isinstance(p.max_size, int) and p.min_size > p.max_size:
                    at(key, ("spec", "nodePools", i, "minSize"), f"must be <= maxSize ({p.min_size} > {p.max_size})")
            for i, c in enumerate(model.spec.components):
                if c.name not in defs.components:
                    at(key, ("spec", "components", i, "name"), f"no Component {c.name!r}")
            for cap, req in model.spec.capabilities.items():
                for b, name in req.prefer.items():
                    if name not in defs.components:
                        at(key, ("spec", "capabilities", cap, "prefer", b), f"no Component {name!r}")

    claimed: dict[str, str] = {}
    for tname, team in sorted(defs.teams.items()):
        key = ("Team", tname)
        for i, c in enumerate(team.spec.placement.clusters):
            if c not in defs.clusters:
                at(key, ("spec", "placement", "clusters", i), f"no Cluster {c!r}")
        for i, ns in enumerate(team.spec.namespaces):
            if ns.name in claimed and claimed[ns.name] != tname:
                at(key, ("spec", "namespaces", i, "name"), f"namespace {ns.name!r} is already claimed by team {claimed[ns.name]!r}")
            claimed.setdefault(ns.name, tname)

    addresses: dict[str, str] = {}
    for cname in sorted(defs.clusters):
        cluster = defs.clusters[cname]
        key = ("Cluster", cname)
        if cluster.spec.owner and cluster.spec.owner not in defs.teams:
            at(key, ("spec", "owner"), f"no Team {cluster.spec.owner!r}")
        b = cluster.spec.backend
        if b.type == "metal":
            names = set()
            for i, h in enumerate(b.hosts):
                if h.name in names:
                    at(key, ("spec", "backend", "hosts", i, "name"), f"duplicate host {h.name!r}")
                names.add(h.name)
                if h.address in addresses and addresses[h.address] != cname:
                    at(key, ("spec", "backend", "hosts", i, "address"), f"address {h.address} is already used by cluster {addresses[h.address]!r}")
                addresses.setdefault(h.address, cname)

    for sname, cs in defs.component_sets.items():
        for i, c in enumerate(cs.spec.components):
            if c.name not in defs.components:
                at(("ComponentSet", sname), ("spec", "components", i, "name"), f"no Component {c.name!r}")

    for pname, pol in defs.policies.items():
        for i, c in enumerate(pol.spec.protected_components):
            if c not in defs.components:
                at(("Policy", pname), ("spec", "protectedComponents", i), f"no Component {c!r}")

    maintenance.check(defs, at)  # calendars, minimum availability of windows

    if not out:
        out.extend(Resolver(defs).problems())
    return out
