"""Resolution: model + variables + overrides + per-backend translation -> DesiredCluster.

Pure and deterministic: the same definitions always give the same
``DesiredCluster`` with the same hash. A :class:`Resolver` caches what many
clusters share (rendered components), so resolving a whole fleet stays linear
and cheap.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Any

from .desired import DesiredCluster, DesiredComponent, DesiredControlPlane, DesiredNodePool, DesiredWorkspace, Machine
from .errors import Problem, SpecInvalid
from .catalogue import Definitions, DocRef, Locator
from .spec import K8S_MINOR, Cluster, ClusterModel, Component, Variable
from . import maintenance, render, translate
from .util import canonical_hash, construct, deep_merge

_VAR = re.compile(r"\$\{var\.([a-zA-Z][a-zA-Z0-9_]*)\}")
_PROTECTED_LABEL = "fleetwright.io/protected"


class _Fail(Exception):
    def __init__(self, kind: str, key: tuple, loc: tuple, message: str):
        self.kind, self.key, self.loc, self.message = kind, key, loc, message


class Resolver:
    """Resolves clusters of one Definitions catalogue, sharing rendered components between them."""

    def __init__(self, defs: Definitions):
        self.defs = defs
        self._locator = Locator(defs.files)
        self._templates: dict[tuple, tuple] = {}
        self._candidates: dict[tuple[str, str], list[str]] = {}
        self._workspace_cache: dict[str, DesiredWorkspace] = {}
        self._dep_cache: dict[tuple[str, str], set[str]] = {}
        self._provides_cache: dict[tuple[str, str], set[str]] = {}
        self._model_vars: dict[int, list[str]] = {}
        self._layer_cache: dict[tuple, tuple] = {}
        self._has_vars: dict[int, bool] = {}  # keyed by id() of values owned by self.defs, which outlive this resolver
        self._protected = {c for p in defs.policies.values() for c in p.spec.protected_components}

    # ------------------------------------------------------------------ public
    def resolve(self, name: str, extra_components: tuple = ()) -> DesiredCluster:
        """Resolve one cluster; ``extra_components`` (ModelComponent) are added as a ComponentSet would add them."""
        hit = None if extra_components else self.defs.resolved.get(name)
        if hit is not None:
            return hit
        try:
            return self._resolve(self.defs.clusters[name], tuple(extra_components))
        except _Fail as f:
            raise SpecInvalid([self._problem(f)]) from None

    def problems(self) -> list[Problem]:
        """Resolve every cluster and return the problems found (used by validation)."""
        out = []
        done = {}
        for name in sorted(self.defs.clusters):
            try:
                done[name] = self._resolve(self.defs.clusters[name])
            except _Fail as f:
                out.append(self._problem(f))
        if not out:
            self.defs.resolved.update(done)
        return out

    def _problem(self, f: _Fail) -> Problem:
        ref = self.defs.refs.get((f.kind, *f.key)) or DocRef("<unknown>", 0)
        line, path = self._locator.locate(ref, f.loc)
        return Problem(ref.file, line, path, f.message)

    # ------------------------------------------------------------------ steps
    def _resolve(self, cluster: Cluster, extra: tuple = ()) -> DesiredCluster:
        cname = cluster.metadata.name
        ckey = ("Cluster", (cname,))
        spec = cluster.spec
        model = self.defs.model(spec.model)
        if model is None:
            versions = sorted(self.defs.models.get(spec.model.partition("@")[0], {}))
            hint = f"; known versions: {', '.join(versions)}" if versions else ""
            raise _Fail(*ckey, ("spec", "model"), f"no ClusterModel {spec.model!r}{hint}")
        variables = self._variables(cluster, model)
        backend = spec.backend
        btype = backend.type

        def sub(value, loc):
            return _substitute_vars(value, variables, ("ClusterModel", (model.metadata.name, model.metadata.version)), loc)

        mspec = model.spec
        mkey = ("ClusterModel", (model.metadata.name, model.metadata.version))
        version = str(sub(mspec.kubernetes.version, ("spec", "kubernetes", "version")))
        if not re.match(K8S_MINOR, version):
            raise _Fail(*mkey, ("spec", "kubernetes", "version"), f"resolves to {version!r}, which is not a Kubernetes minor version like '1.29'")

        cp_replicas = spec.overrides.control_plane_replicas or int(sub(mspec.control_plane.replicas, ("spec", "controlPlane", "replicas")))
        cp_size = str(sub(mspec.control_plane.size, ("spec", "controlPlane", "size")))
        control_plane = construct(DesiredControlPlane, replicas=cp_replicas, size=cp_size,
                                            machine=translate.machine(btype, cp_size, None, backend))

        overrides = {o.name: (i, o) for i, o in enumerate(spec.overrides.node_pools)}
        pool_names = {p.name for p in mspec.node_pools}
        for i, o in enumerate(spec.overrides.node_pools):
            if o.name not in pool_names:
                raise _Fail(*ckey, ("spec", "overrides", "nodePools", i, "name"),
                            f"model {spec.model} has no node pool {o.name!r}; it has {sorted(pool_names)}")
        pools = []
        for pi, p in enumerate(mspec.node_pools):
            base = ("spec", "nodePools", pi)
            replicas = int(sub(p.replicas, base + ("replicas",)))
            mn, mx = int(sub(p.min_size, base + ("minSize",))), int(sub(p.max_size, base + ("maxSize",)))
            size = str(sub(p.size, base + ("size",)))
            autoscaling = p.autoscaling
            where = (mkey, base)
            if p.name in overrides:
                oi, o = overrides[p.name]
                replicas = o.replicas if o.replicas is not None else replicas
                mn = o.min_size if o.min_size is not None else mn
                mx = o.max_size if o.max_size is not None else mx
                size = o.size or size
                autoscaling = o.autoscaling if o.autoscaling is not None else autoscaling
                where = (ckey, ("spec", "overrides", "nodePools", oi))
            if mn > mx:
                raise _Fail(*where[0], where[1] + ("minSize",), f"must be <= maxSize ({mn} > {mx})")
            if not mn <= replicas <= mx:
                raise _Fail(*where[0], where[1] + ("replicas",), f"must be between minSize and maxSize ({mn}..{mx}), got {replicas}")
            if size not in translate.SIZES:
                raise _Fail(*where[0], where[1] + ("size",), f"unknown size {size!r}; one of {sorted(translate.SIZES)}")
            pools.append(construct(DesiredNodePool, name=p.name, replicas=replicas, min_size=mn, max_size=mx, size=size,
                                         machine=translate.machine(btype, size, p.name, backend),
                                         labels=p.labels, taints=p.taints, autoscaling=autoscaling))
        if btype == "aws":
            for pname in backend.node_pools:
                if pname not in pool_names:
                    raise _Fail(*ckey, ("spec", "backend", "nodePools", pname),
                                f"model {spec.model} has no node pool {pname!r}; it has {sorted(pool_names)}")

        machines = self._machines(cluster, control_plane, pools)
        workspaces = self._workspaces(cluster)
        needs_gitops = any(t.spec.gitops is not None for t in self.defs.teams.values() if placed(t, cluster))
        components = self._components(cluster, model, version, variables, needs_gitops, extra)
        labels = dict(cluster.metadata.labels)
        core = {
            "name": cname, "labels": labels, "model": model.metadata.name, "modelVersion": model.metadata.version,
            "driftMode": spec.drift_mode, "owner": spec.owner, "backend": backend.model_dump(mode="json"),
            "kubernetesVersion": version,
            "controlPlane": [control_plane.replicas, control_plane.size, control_plane.machine],
            "nodePools": [[p.name, p.replicas, p.min_size, p.max_size, p.size, p.machine, p.labels, p.taints]
                          + (["autoscaling"] if p.autoscaling else []) for p in pools],
            "machines": [[m.name, m.role, m.pool, m.address, m.cpu, m.memory_mib] for m in machines],
            "components": [c.hash for c in components], "workspaces": [w.hash for w in workspaces],
        }
        try:
            maint = maintenance.merge(maintenance.levels_of(self.defs, cluster, model), self.defs.files, cname)
        except maintenance.MergeProblem as m:
            raise _Fail(m.kind, m.key, m.loc, m.message) from None
        return construct(DesiredCluster,
            name=cname, labels=labels, model=model.metadata.name, model_version=model.metadata.version,
            drift_mode=spec.drift_mode, protected=labels.get(_PROTECTED_LABEL) == "true", owner=spec.owner,
            backend=backend, kubernetes_version=version, control_plane=control_plane, node_pools=pools,
            machines=machines, components=components, workspaces=workspaces, hash=canonical_hash(core), maintenance=maint,
        )

    def _variables(self, cluster: Cluster, model: ClusterModel) -> dict[str, Any]:
        declared = {v.name: v for v in model.spec.variables}
        ckey = ("Cluster", (cluster.metadata.name,))
        out: dict[str, Any] = {}
        for name, value in cluster.spec.variables.items():
            if name not in declared:
                raise _Fail(*ckey, ("spec", "variables", name),
                            f"model {cluster.spec.model} declares no variable {name!r}; it declares {sorted(declared) or 'none'}")
            err = check_variable(declared[name], value)
            if err:
                raise _Fail(*ckey, ("spec", "variables", name), err)
            out[name] = value
        for name, var in declared.items():
            if name not in out:
                if var.default is None:
                    if var.required:
                        raise _Fail(*ckey, ("spec", "variables"),
                                    f"variable {name!r} is required by model {cluster.spec.model} and has no default")
                    continue
                out[name] = var.default
        return out

    def _machines(self, cluster: Cluster, cp: DesiredControlPlane, pools: list[DesiredNodePool]) -> list[Machine]:
        backend = cluster.spec.backend
        name = cluster.metadata.name
        ckey = ("Cluster", (name,))
        if backend.type == "vsphere":
            start, end = ipaddress.IPv4Address(backend.ip_pool.start), ipaddress.IPv4Address(backend.ip_pool.end)
            size = int(end) - int(start) + 1
            need = cp.replicas + sum(p.max_size for p in pools)
            if size <= 0 or need > size:
                raise _Fail(*ckey, ("spec", "backend", "ipPool"),
                            f"has {max(size, 0)} addresses, but the control plane and node pools (at maxSize) need {need}")
            # no address here: the vSphere backend allocates each VM's address once from the pool and
            # records it on the VM (stable across changes of replicas and maxSize)
            out = [construct(Machine, name=f"{name}-cp-{i}", role="controlPlane", address=None,
                             cpu=cp.machine.get("cpu"), memory_mib=cp.machine.get("memoryMiB"))
                   for i in range(cp.replicas)]
            for p in pools:
                out += [construct(Machine, name=f"{name}-{p.name}-{i}", role="worker", pool=p.name, address=None,
                                  cpu=p.machine.get("cpu"), memory_mib=p.machine.get("memoryMiB"))
                        for i in range(p.replicas)]
            return out
        if backend.type == "metal":
            cps = [h for h in backend.hosts if h.role == "controlPlane"]
            if len(cps) < cp.replicas:
                raise _Fail(*ckey, ("spec", "backend", "hosts"),
                            f"the control plane needs {cp.replicas} hosts with role controlPlane; {len(cps)} listed")
            out = [construct(Machine, name=h.name, role="controlPlane", address=h.address) for h in cps[: cp.replicas]]
            first = pools[0].name
            for p in pools:
                hosts = [h for h in backend.hosts if h.role == "worker" and (h.pool or first) == p.name]
                if len(hosts) < p.replicas:
                    raise _Fail(*ckey, ("spec", "backend", "hosts"),
                                f"node pool {p.name!r} needs {p.replicas} worker hosts; {len(hosts)} listed")
                out += [construct(Machine, name=h.name, role="worker", pool=p.name, address=h.address) for h in hosts[: p.replicas]]
            return out
        return []

    def _components(self, cluster: Cluster, model: ClusterModel, version: str, variables: dict,
                    needs_gitops: bool = False, extra: tuple = ()) -> list[DesiredComponent]:
        """The cluster's components, rendered, in dependency order.

        Which components and which value layers depend only on the model, the backend, the
        variables the model's values use, the cluster's component list and overrides, the
        ComponentSets that pick it and whether a workspace needs GitOps; clusters that agree on
        all of these share one computation (a fleet has few such combinations).
        """
        spec = cluster.spec
        btype = spec.backend.type
        used = self._model_vars.get(id(model))
        if used is None:
            used = self._model_vars[id(model)] = sorted(set(_VAR.findall(repr(
                [model.spec.capabilities, [c.values for c in model.spec.components]]))))
        sets = tuple(n for n in sorted(self.defs.component_sets)
                     if matches(cluster.metadata.labels, self.defs.component_sets[n].spec.cluster_selector.match_labels))
        key = (id(model), btype, repr([variables.get(v) for v in used]), repr(spec.components),
               repr(spec.overrides.components), sets, needs_gitops, repr(extra))
        hit = self._layer_cache.get(key)
        if hit is None:
            hit = self._layer_cache[key] = self._component_layers(cluster, model, variables, needs_gitops, extra)
        order, wanted = hit
        ctx = {"name": cluster.metadata.name, "labels": dict(cluster.metadata.labels), "backend": btype,
               "kubernetesVersion": version}
        return [self._render(self.defs.components[name], btype, wanted[name], ctx, name in self._protected)
                for name in order]

    def _component_layers(self, cluster: Cluster, model: ClusterModel, variables: dict, needs_gitops: bool,
                          extra: tuple) -> tuple[list[str], dict[str, list[dict]]]:
        spec = cluster.spec
        btype = spec.backend.type
        ckey = ("Cluster", (cluster.metadata.name,))
        mkey = ("ClusterModel", (model.metadata.name, model.metadata.version))
        wanted: dict[str, list[dict]] = {}  # name -> list of value layers, lowest first
        reasons: dict[str, tuple] = {}

        for cap, req in model.spec.capabilities.items():
            chosen = req.prefer.get(btype)
            candidates = self._candidates.get((cap, btype))
            if candidates is None:
                candidates = self._candidates[(cap, btype)] = sorted(
                    c.metadata.name for c in self.defs.components.values() if cap in translate.provides(c, btype))
            if chosen:
                comp = self.defs.components.get(chosen)
                if comp is None or cap not in self._provides(chosen, btype):
                    raise _Fail(*mkey, ("spec", "capabilities", cap, "prefer", btype),
                                f"{chosen!r} does not provide {cap} on {btype}; candidates: {sorted(candidates) or 'none'}")
            elif len(candidates) == 1:
                chosen = candidates[0]
            elif not candidates:
                raise _Fail(*ckey, ("spec", "backend", "type"),
                            f"model {spec.model} asks for capability {cap!r}, and no component provides it on {btype}")
            else:
                raise _Fail(*mkey, ("spec", "capabilities", cap),
                            f"several components provide {cap} on {btype} ({', '.join(sorted(candidates))}): name one in prefer.{btype}")
            wanted.setdefault(chosen, []).append(self._subst(req.values, variables, mkey, ("spec", "capabilities", cap, "values")))
            reasons.setdefault(chosen, (mkey, ("spec", "capabilities", cap)))

        for i, mc in enumerate(model.spec.components):
            wanted.setdefault(mc.name, []).append(self._subst(mc.values, variables, mkey, ("spec", "components", i, "values")))
            reasons.setdefault(mc.name, (mkey, ("spec", "components", i, "name")))
        for sname in sorted(self.defs.component_sets):
            cs = self.defs.component_sets[sname]
            if matches(cluster.metadata.labels, cs.spec.cluster_selector.match_labels):
                for i, sc in enumerate(cs.spec.components):
                    wanted.setdefault(sc.name, []).append(sc.values)
                    reasons.setdefault(sc.name, (("ComponentSet", (sname,)), ("spec", "components", i, "name")))
        for i, cc in enumerate(spec.components):
            wanted.setdefault(cc.name, []).append(cc.values)
            reasons.setdefault(cc.name, (ckey, ("spec", "components", i, "name")))
        for cc in extra:  # added by a flow (add_component) before its ComponentSet lands in Git
            wanted.setdefault(cc.name, []).append(cc.values)
            reasons.setdefault(cc.name, (ckey, ("metadata", "name")))
        for name, ov in spec.overrides.components.items():
            if name not in wanted and not ov.enabled and name in self.defs.components:
                continue  # "never here": how the definitions name the removal of a component added imperatively
            if name not in wanted:
                raise _Fail(*ckey, ("spec", "overrides", "components", name),
                            f"this cluster has no component {name!r} to override; it has {sorted(wanted)}")
            if not ov.enabled:
                del wanted[name]
            else:
                wanted[name].append(ov.values)

        if needs_gitops and not any("gitops" in self._provides(n, btype)
                                    for n in wanted if n in self.defs.components):
            flux = sorted(c.metadata.name for c in self.defs.components.values() if "gitops" in translate.provides(c, btype))
            if not flux:
                raise _Fail(*ckey, ("metadata", "name"),
                            f"a team workspace here has a GitOps source, and no component provides gitops on {btype}")
            wanted[flux[0]] = []
            reasons[flux[0]] = (ckey, ("metadata", "name"))

        # dependencies are included automatically
        queue = list(wanted)
        while queue:
            name = queue.pop()
            comp = self.defs.components.get(name)
            if comp is None:
                k, loc = reasons[name]
                raise _Fail(*k, loc, f"no Component {name!r}")
            deps = self._deps(name, btype)
            for dep in deps:
                if dep not in self.defs.components:
                    raise _Fail("Component", (name,), ("spec", "dependsOn"), f"no Component {dep!r}")
                if dep not in wanted:
                    wanted[dep] = []
                    reasons[dep] = reasons[name]
                    queue.append(dep)
            if not translate.available(comp, btype):
                k, loc = reasons[name]
                raise _Fail(*k, loc, f"component {name!r} is not available on {btype}")

        names = set(wanted)
        order = _toposort({n: self._deps(n, btype) & names for n in wanted})
        if order is None:
            raise _Fail(*ckey, ("spec",), f"components have a dependency cycle among {sorted(wanted)}")
        return order, wanted

    def _provides(self, name: str, btype: str) -> set[str]:
        key = (name, btype)
        hit = self._provides_cache.get(key)
        if hit is None:
            hit = self._provides_cache[key] = translate.provides(self.defs.components[name], btype)
        return hit

    def _subst(self, values: dict, variables: dict, key: tuple, loc: tuple) -> dict:
        """Substitute ``${var.x}`` in a model's values; values without references are shared as they are."""
        has = self._has_vars.get(id(values))
        if has is None:
            has = self._has_vars[id(values)] = "${var." in repr(values)
        return _substitute_vars(values, variables, key, loc) if has else values

    def _deps(self, name: str, btype: str) -> set[str]:
        """What ``name`` needs installed first on ``btype``: its dependsOn, plus Flux for a Helm source."""
        key = (name, btype)
        deps = self._dep_cache.get(key)
        if deps is None:
            comp = self.defs.components[name]
            deps = set(comp.spec.depends_on)
            if translate.source_of(comp, btype).kind() == "helm":
                flux = sorted(c.metadata.name for c in self.defs.components.values() if "gitops" in translate.provides(c, btype))
                if not flux:
                    raise _Fail("Component", (name,), ("spec", "source", "helm"),
                                f"a Helm source is installed as a Flux HelmRelease, and no component provides gitops on {btype}")
                deps.add(flux[0])
            deps = self._dep_cache[key] = deps
        return deps

    def _render(self, comp: Component, btype: str, layers: list[dict], ctx: dict, protected: bool) -> DesiredComponent:
        name = comp.metadata.name
        key = (name, btype, repr(layers), protected)  # a cache key only: equal content may miss, never mismatch
        entry = self._templates.get(key)
        if entry is None:
            values = translate.values(comp, btype)
            for layer in layers:
                values = deep_merge(values, layer)
            source = translate.source_of(comp, btype)
            try:
                tpl = render.prepare(comp, source, values)
            except render.RenderError as e:
                impl = comp.spec.backends.get(btype)
                src_loc = ("spec", "backends", btype, "source") if impl is not None and impl.source else ("spec", "source")
                raise _Fail("Component", (name,), src_loc + e.loc, e.message) from None
            base_hash = canonical_hash({"name": name, "version": comp.spec.version, "objects": tpl.objects,
                                        "addon": tpl.addon, "values": tpl.values})
            common = dict(name=name, version=comp.spec.version, namespace=comp.spec.namespace,
                          provides=sorted(translate.provides(comp, btype)), depends_on=sorted(self._deps(name, btype)),
                          source=tpl.key, target="infrastructure" if tpl.key == "eksAddon" else "kubernetes",
                          addon=tpl.addon, k8s_min=comp.spec.kubernetes.min, k8s_max=comp.spec.kubernetes.max,
                          protected=protected, health_timeout_seconds=comp.spec.health_timeout_seconds)
            shared = None if tpl.holes else construct(DesiredComponent, objects=tpl.objects, values=tpl.values, hash=base_hash, **common)
            entry = self._templates[key] = (tpl, base_hash, common, shared)
        tpl, base_hash, common, shared = entry
        if shared is not None:
            return shared
        try:
            objects, vals, filled = tpl.finish(ctx)
        except render.RenderError as e:
            raise _Fail("Component", (name,), ("spec",), e.message) from None
        fill_key = "\x00".join(f if isinstance(f, str) else canonical_hash(f) for f in filled)
        return construct(DesiredComponent, objects=objects, values=vals,
                         hash=hashlib.sha256(f"{base_hash}\x00{fill_key}".encode()).hexdigest()[:16], **common)

    def _workspaces(self, cluster: Cluster) -> list[DesiredWorkspace]:
        out = []
        for name in sorted(self.defs.teams):
            team = self.defs.teams[name]
            if not placed(team, cluster):
                continue
            ws = self._workspace_cache.get(name)
            if ws is None:
                objects = render.workspace_objects(team)
                ws = self._workspace_cache[name] = DesiredWorkspace(
                    team=name, namespaces=[n.name for n in team.spec.namespaces], objects=objects, hash=canonical_hash(objects),
                    role=team.spec.role, groups=list(team.spec.groups), members=list(team.spec.members))
            out.append(ws)
        return out


def placed(team, cluster: Cluster) -> bool:
    p = team.spec.placement
    if cluster.metadata.name in p.clusters:
        return True
    if p.selector is not None and p.selector.match_labels:
        labels = cluster.metadata.labels
        return all(labels.get(k) == v for k, v in p.selector.match_labels.items())
    return False


def matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _toposort(graph: dict[str, set[str]]) -> list[str] | None:
    order, done, pending = [], set(), dict(graph)
    while pending:
        ready = sorted(n for n, deps in pending.items() if deps <= done)
        if not ready:
            return None
        for n in ready:
            order.append(n)
            done.add(n)
            del pending[n]
    return order


_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "object": (dict,), "array": (list,)}


def check_variable(var: Variable, value: Any) -> str | None:
    """Return why ``value`` does not fit ``var``, or None."""
    ok = _TYPES[var.type]
    if isinstance(value, bool) and var.type != "boolean" or not isinstance(value, ok):
        return f"must be of type {var.type}, got {type(value).__name__} {value!r}"
    if var.enum is not None and value not in var.enum:
        return f"must be one of {var.enum}, got {value!r}"
    if var.minimum is not None and isinstance(value, (int, float)) and value < var.minimum:
        return f"must be >= {var.minimum:g}, got {value}"
    if var.maximum is not None and isinstance(value, (int, float)) and value > var.maximum:
        return f"must be <= {var.maximum:g}, got {value}"
    if var.pattern is not None and isinstance(value, str) and not re.search(var.pattern, value):
        return f"{value!r} does not match pattern {var.pattern}"
    return None


def _substitute_vars(value: Any, variables: dict, key: tuple, loc: tuple) -> Any:
    if isinstance(value, str):
        if "${" not in value:
            return value
        m = _VAR.fullmatch(value)
        if m:
            if m.group(1) not in variables:
                raise _Fail(*key, loc, f"refers to undeclared or unset variable {m.group(1)!r}")
            return variables[m.group(1)]

        def rep(mm):
            if mm.group(1) not in variables:
                raise _Fail(*key, loc, f"refers to undeclared or unset variable {mm.group(1)!r}")
            return str(variables[mm.group(1)])
        return _VAR.sub(rep, value)
    if isinstance(value, dict):
        return {k: _substitute_vars(v, variables, key, loc + (k,)) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_vars(v, variables, key, loc + (i,)) for i, v in enumerate(value)]
    return value


def resolve(defs: Definitions, cluster: str) -> DesiredCluster:
    """Resolve one cluster. Raises SpecInvalid with a located problem."""
    return Resolver(defs).resolve(cluster)


def resolve_all(defs: Definitions) -> dict[str, DesiredCluster]:
    r = Resolver(defs)
    return {name: r.resolve(name) for name in sorted(defs.clusters)}
