"""Pins: `place` statements as solver constraints, checked against the cluster and the shapes."""

from __future__ import annotations

from rlhfc import ir
from rlhfc.frontend import ast
from rlhfc.frontend.check.common import Reporter, Unit, Values, by_key, suggest


def _mesh(ref: ast.MeshRef, cluster: ir.Cluster, rep: Reporter) -> ir.Mesh | None:
    """`node0[0:4]` / `node1` / `nodes[0:2]` as a Mesh, checked against the cluster (E015)."""
    base, dpn = ref.base.text, cluster.devices_per_node
    sliced = ref.start is not None
    if base == "nodes":
        first, count = (ref.start, ref.stop - ref.start) if sliced else (0, cluster.nodes)
        mesh, limit = ir.Mesh(first, count, 0, dpn), (first + count, cluster.nodes, "nodes")
    elif base.startswith("node") and base[4:].isdigit() and len(base) < 14:
        node = int(base[4:])
        first, count = (ref.start, ref.stop - ref.start) if sliced else (0, dpn)
        mesh = ir.Mesh(node, 1, first, count)
        if node >= cluster.nodes:
            rep.error("E015", f"node {node} is outside the cluster ({cluster.nodes} node(s))", ref.base.span,
                      f"nodes are numbered 0..{cluster.nodes - 1}")
            return None
        limit = (first + count, dpn, "devices per node")
    else:
        rep.error("E022", f"bad mesh `{base}`", ref.base.span, "meshes: node0[0:4], node1, nodes[0:2]")
        return None
    if count <= 0:
        rep.error("E015", "empty device range", ref.span, "write [start:stop] with start < stop")
        return None
    if limit[0] > limit[1]:
        rep.error("E015", f"mesh `{mesh}` is outside the cluster ({limit[1]} {limit[2]})", ref.span,
                  f"the cluster is {cluster.nodes} node(s) x {dpn} device(s)")
        return None
    return mesh


def check_pins(unit: Unit, calls: tuple[ir.Call, ...], names: set[str], models: dict[str, ir.Model],
                cluster: ir.Cluster, rep: Reporter, val: Values) -> tuple[ir.Pin, ...]:
    """`place` statements as Pins: call, mesh, degrees, head divisibility (shape checks need a bound call)."""
    by_name = {c.name: c for c in calls}
    pins: dict[str, ir.Pin] = {}
    for place in unit.statements(ast.PlaceStmt):
        call = by_name.get(place.call.text)
        if place.call.text not in names:
            rep.error("E002", f"no call `{place.call.text}` in the run's dataflow", place.call.span,
                      suggest(place.call.text, sorted(names)) or "pins name calls of the dataflow that `run` uses")
        if place.call.text in pins:
            rep.error("E003", f"call `{place.call.text}` is pinned twice", place.call.span)
        mesh = _mesh(place.mesh, cluster, rep)
        opts = by_key(place.options, rep, "`place`")
        degrees, recompute = {}, False
        for key, opt in opts.items():
            if key in ("dp", "tp", "pp", "n_mbs", "token_budget"):
                degrees[key] = val.positive_int(opt)
            elif key == "recompute" and isinstance(opt.value, ast.Bool):
                recompute = opt.value.value
            elif key == "recompute":
                rep.error("E022", "`recompute` must be true or false", opt.value.span)
            else:
                val.unknown(opt.key, ("dp", "tp", "pp", "n_mbs", "token_budget", "recompute"), "`place`")
        missing = [k for k in ("dp", "tp", "pp") if k not in opts]
        if missing:
            rep.error("E024", f"`place` needs {', '.join(missing)}", place.span, "place CALL on MESH dp = N tp = N pp = N")
        if recompute and call is not None and call.kind is not ir.CallKind.TRAIN:
            rep.error("E022", f"`recompute` applies to train calls; `{call.name}` is a {call.kind.value} call",
                      opts["recompute"].value.span)
        if mesh is None or missing or None in degrees.values():
            continue
        dp, tp, pp = degrees["dp"], degrees["tp"], degrees["pp"]
        if dp * tp * pp != mesh.size:
            rep.error("E016", f"dp * tp * pp = {dp * tp * pp} but mesh `{mesh}` has {mesh.size} devices",
                      place.span, "the degrees must multiply to the mesh size")
        shape = models[call.model].shape if call is not None else None
        if tp > cluster.devices_per_node:
            rep.error("E014", f"tp = {tp} spans more than one node ({cluster.devices_per_node} devices each)",
                      opts["tp"].value.span, "tensor parallelism stays inside a node")
        elif shape is not None and (shape.n_heads % tp or shape.n_kv_heads % tp):
            rep.error("E014", f"tp = {tp} does not divide the heads of `{call.model}` "
                              f"({shape.n_heads} heads, {shape.n_kv_heads} kv heads)", opts["tp"].value.span,
                      "choose tp dividing both head counts")
        if call is None:
            continue
        budget = _budget(call, dp, degrees, opts, rep)
        pins[place.call.text] = ir.Pin(place.call.text, ir.Strategy(mesh, dp, tp, pp, budget, recompute), place.span)
    return tuple(pins.values())


def _budget(call: ir.Call, dp: int, degrees: dict, opts: dict, rep: Reporter) -> int:
    """The pin's token budget: as written, or the one its `n_mbs` implies (each replica's
    rows cut into that many micro-batches); 0 (a replica's whole batch in one) without
    either. E022 for both at once, `n_mbs` above the rows of a replica, or a budget
    below one row's priced tokens (the runtime never splits a sequence)."""
    n_mbs, budget = degrees.get("n_mbs"), degrees.get("token_budget")
    if n_mbs and budget:
        rep.error("E022", "pin `n_mbs` or `token_budget`, not both: the budget decides the micro-batches",
                  opts["token_budget"].key.span, "keep one of them")
    elif n_mbs and n_mbs > max(1, call.rows // dp):
        each = call.rows // dp
        rep.error("E022", f"`n_mbs = {n_mbs}` micro-batches cannot split the {each} row(s) that each of "
                          f"the dp = {dp} replica(s) of `{call.name}` gets ({call.rows} rows)",
                  opts["n_mbs"].value.span, f"n_mbs = 1 .. {max(1, each)} here")
    elif n_mbs:
        return call.budget_for(dp, n_mbs)
    elif budget and budget < call.row_len:
        pair = " (a chosen/rejected pair)" if call.row_len > call.seq_len else ""
        rep.error("E022", f"`token_budget = {budget}` is below one row of `{call.name}`{pair}: {call.row_len} "
                          "priced tokens, and a sequence is never split", opts["token_budget"].value.span,
                  f"token_budget >= {call.row_len} here (or pin n_mbs)")
    return budget or 0
