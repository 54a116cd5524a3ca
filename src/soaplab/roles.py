"""Which parameter of any ``nn.Module`` plays which role, so optimizers can route them.

Muon (and ``soap_hidden``) should only see the hidden matrices; embeddings, output heads, the
first layer reading raw inputs and vectors go to AdamW. Shapes alone cannot tell (a tied
embedding/head is 2-D too), so the rule reads, in order, first match wins per tensor:

1. explicit marks: ``overrides`` ``{glob on the name: role}``, the model's own
   ``param_roles()``, a tensor attribute ``_soaplab_role``;
2. tied tensors: a tensor shared by an embedding and a head is an ``embedding``, once;
3. the model's metadata: Hugging Face ``get_input_embeddings()``/``get_output_embeddings()``,
   timm's ``pretrained_cfg`` (``first_conv``, ``classifier``) and ``no_weight_decay()``;
4. module types: ``nn.Embedding``, norm layers, biases, ``nn.Linear``/HF ``Conv1D``/``ConvNd``
   weights, MoE routers and expert stacks (a module with ``num_experts``); without metadata,
   the first and last weight-bearing modules are the ``input`` and the ``head`` ("position");
5. names, last: ``lm_head``, ``classifier``, ``pos_embed`` ... (flagged);
and shapes only demote: fewer than two dimensions longer than 1 make a ``vector``.

A hidden matrix (or stack) also has a **part** of the transformer block it sits in, for
optimizers that treat attention and MLP differently (``soap_muon``; :func:`infer_parts`):
``attention`` for the block's branch that holds the attention (its projections and output
projection), ``mlp`` for the block's other branches (the MLP, a mixture of experts and its
router), ``other`` outside every block. Blocks and attention modules come, in order, from an
explicit ``_soaplab_part`` tensor attribute; Hugging Face's ``_can_record_outputs`` (its
``hidden_states`` class is the block, its ``attentions`` classes the attention); module
structure (``nn.MultiheadAttention``, a module with a head count such as ``num_heads`` or
``n_head``, as ``num_experts`` marks expert stacks; a block is a layer of an ``nn.ModuleList``
or ``nn.Sequential`` that holds one); and, last and flagged, names (``attn``, ``mlp`` ...).

Conv kernels are ``hidden`` (no separate role): Muon orthogonalizes them as
``(out, in * kh * kw)`` and SOAP treats them as it treats any hidden tensor; depthwise kernels
``(C, 1, k...)`` are vectors. Frozen parameters get no role.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

HIDDEN, EMBEDDING, HEAD, INPUT, VECTOR, STACK = \
    "hidden", "embedding", "head", "input", "vector", "stack"
ROLES = (HIDDEN, EMBEDDING, HEAD, INPUT, VECTOR, STACK)
# Roles Muon and soap_hidden's SOAP half take: the matrices inside the network.
MATRIX_ROLES = (HIDDEN, STACK)
# Evidence that is a guess: describe_roles flags it so a user checks it.
GUESSES = ("position", "name", "unknown")
# Where a hidden matrix sits in a transformer block (infer_parts).
ATTENTION, MLP, OTHER = "attention", "mlp", "other"
PARTS = (ATTENTION, MLP, OTHER)

_WRAPPERS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_HEAD_NAMES = ("lm_head", "head", "classifier", "score", "output")
_EMBEDDING_NAMES = ("wte", "wpe", "embed", "embeddings", "tok_embeddings", "pos_embed",
                    "patch_embed", "position_embeddings")
_HEAD_COUNTS = ("num_heads", "n_head", "n_heads", "num_attention_heads")
_ATTENTION_NAMES = ("attn", "attention", "self_attn", "self_attention", "cross_attn",
                    "crossattention")
_MLP_NAMES = ("mlp", "ffn", "feed_forward", "feedforward", "moe", "experts")
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


@dataclass(frozen=True)
class Role:
    """A parameter's role and the evidence for it (``explicit``, ``tied``, ``metadata``,
    ``module``, ``position``, ``name``, ``shape`` or ``unknown``)."""

    role: str
    evidence: str

    @property
    def guessed(self) -> bool:
        return self.evidence in GUESSES


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def infer_roles(model: nn.Module, overrides: Mapping[str, str] | None = None
                ) -> dict[str, Role]:
    """``{name: Role}`` for every trainable parameter of ``model`` (names as
    ``unwrap(model).named_parameters()`` gives them: a tied tensor appears once)."""
    model = unwrap(model)
    for role in (overrides or {}).values():
        _check_role(role, "overrides")
    aliases = _aliases(model)
    explicit = _explicit(model, aliases)
    ends = _ends(model)
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((_canonical(mname), module, attr))
    roles = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        names = aliases[id(p)]
        pattern = next((pat for pat in (overrides or {}) if
                        any(fnmatch.fnmatchcase(n, pat) for n in names)), None)
        if pattern is not None:
            roles[name] = Role(overrides[pattern], "explicit")
        elif id(p) in explicit:
            roles[name] = Role(explicit[id(p)], "explicit")
        else:
            roles[name] = _demote(p, _inferred(p, owners[id(p)], ends))
    return roles


def param_roles(model: nn.Module, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{parameter name: role}`` for every trainable parameter (see the module docstring)."""
    return {name: r.role for name, r in infer_roles(model, overrides).items()}


def _check_role(role: Any, where: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} in {where}; roles are {', '.join(ROLES)}")


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each tensor (tied weights have several), in registration order."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(_canonical(name))
    return names


def _canonical(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


def _explicit(model: nn.Module, aliases: dict[int, list[str]]) -> dict[int, str]:
    """Roles the model states: its ``param_roles()`` (keyed by any alias) and ``_soaplab_role``
    tensor attributes."""
    found = {id(p): p._soaplab_role for p in model.parameters() if hasattr(p, "_soaplab_role")}
    if not callable(getattr(model, "param_roles", None)):
        for role in found.values():
            _check_role(role, "a _soaplab_role attribute")
        return found
    stated = dict(model.param_roles())
    by_alias = {n: key for key, names in aliases.items() for n in names}
    unknown = sorted(set(stated) - set(by_alias))
    if unknown:
        raise ValueError(f"param_roles() of {type(model).__name__} names parameters it does "
                         f"not have: {', '.join(unknown)}")
    for n, role in stated.items():
        _check_role(role, f"param_roles() of {type(model).__name__}")
        found[by_alias[n]] = role
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in found]
    if missing:
        raise ValueError(f"param_roles() of {type(model).__name__} gives no role to "
                         f"{', '.join(missing)}")
    return found


@dataclass(frozen=True)
class _Ends:
    """The modules at the model's two ends, with where that knowledge came from."""

    embeddings: frozenset[int]  # id(module)
    inputs: frozenset[int]
    heads: frozenset[int]
    input_evidence: str
    head_evidence: str
    no_decay_names: frozenset[str]  # timm's no_weight_decay(): position embeddings, tokens


def _ends(model: nn.Module) -> _Ends:
    embeddings, inputs, heads = set(), set(), set()
    input_evidence = head_evidence = "metadata"
    hf = callable(getattr(model, "get_input_embeddings", None))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if hf:
        for getter, into in (("get_input_embeddings", None), ("get_output_embeddings", heads)):
            try:
                module = getattr(model, getter)()
            except (NotImplementedError, AttributeError):
                module = None
            if isinstance(module, nn.Module):
                target = into if into is not None else \
                    (embeddings if isinstance(module, nn.Embedding) else inputs)
                target.update(id(m) for m in module.modules())
    if cfg:
        modules = dict(model.named_modules())
        for key, into in (("first_conv", inputs), ("classifier", heads)):
            names = cfg.get(key) or ()
            for n in [names] if isinstance(names, str) else names:
                if n in modules:
                    into.update(id(m) for m in modules[n].modules())
    if not hf and not cfg:  # no metadata: the first and last layers (in registration order)
        layers = [m for _, m in model.named_modules() if isinstance(m, _LAYERS)]
        if layers and not isinstance(layers[0], nn.Embedding):
            inputs.add(id(layers[0]))
        if len(layers) > 1:
            heads.add(id(layers[-1]))
        input_evidence = head_evidence = "position"
    no_decay = getattr(model, "no_weight_decay", None)
    no_decay_names = frozenset(no_decay()) if callable(no_decay) and cfg else frozenset()
    return _Ends(frozenset(embeddings), frozenset(inputs), frozenset(heads), input_evidence,
                 head_evidence, no_decay_names)


def _inferred(p: torch.Tensor, owners: list[tuple[str, nn.Module, str]], ends: _Ends) -> Role:
    """A tensor's role from each module that owns it (tied tensors have several owners)."""
    roles = [_owned(mname, module, attr, p, ends) for mname, module, attr in owners]
    at_ends = [r for r in roles if r.role in (EMBEDDING, HEAD)]
    if len(owners) > 1 and at_ends:
        return Role(EMBEDDING, "tied")
    return at_ends[0] if at_ends else roles[0]


def _owned(mname: str, module: nn.Module, attr: str, p: torch.Tensor, ends: _Ends) -> Role:
    """The role of ``module.attr`` from metadata, module type and, last, names."""
    name = f"{mname}.{attr}" if mname else attr
    if attr == "bias" or isinstance(module, _NORMS) or type(module).__name__.endswith("Norm"):
        return Role(VECTOR, "module")
    if id(module) in ends.embeddings:
        return Role(EMBEDDING, "metadata")
    if id(module) in ends.heads:
        return Role(HEAD, ends.head_evidence)
    if id(module) in ends.inputs:
        return Role(INPUT, ends.input_evidence)
    if name in ends.no_decay_names:
        return Role(EMBEDDING, "metadata")
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return Role(EMBEDDING, "module")
    experts = getattr(module, "num_experts", None)
    if experts is not None and p.dim() >= 2 and p.shape[0] == experts:
        return Role(STACK if p.dim() >= 3 else HIDDEN, "module")  # expert stacks; the router
    matrix = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    if matrix or isinstance(module, nn.modules.conv._ConvNd):
        if isinstance(module, nn.modules.conv._ConvNd) and p.shape[1] == 1:
            return Role(VECTOR, "module")  # depthwise: one input channel per kernel
        hint = mname.rsplit(".", 1)[-1]
        if not ends.heads and hint in _HEAD_NAMES:
            return Role(HEAD, "name")
        return Role(HIDDEN, "module")
    if any(part in _EMBEDDING_NAMES for part in name.split(".")):
        return Role(EMBEDDING, "name")
    return Role(VECTOR, "unknown")


def _demote(p: torch.Tensor, role: Role) -> Role:
    """Shapes only demote: fewer than two dimensions longer than 1 make a vector."""
    if role.role != VECTOR and sum(d > 1 for d in p.shape) < 2:
        return Role(VECTOR, "shape")
    return role


@dataclass(frozen=True)
class Part:
    """A hidden matrix's part of its block (``attention``, ``mlp`` or ``other``) and the
    evidence for it (``explicit``, ``metadata``, ``module``, ``name`` or ``unknown``)."""

    part: str
    evidence: str

    @property
    def guessed(self) -> bool:
        return self.evidence in GUESSES


def infer_parts(model: nn.Module, overrides: Mapping[str, str] | None = None
                ) -> dict[str, Part]:
    """``{name: Part}`` for every parameter whose role is ``hidden`` or ``stack`` (see the
    module docstring); ``overrides`` are the roles' (:func:`infer_roles`)."""
    return _parts(model, infer_roles(model, overrides))


def _parts(model: nn.Module, roles: Mapping[str, Role]) -> dict[str, Part]:
    """:func:`infer_parts` given the model's roles (callers that have them infer them once)."""
    model = unwrap(model)
    named = dict(model.named_parameters())
    structure = _blocks(model)
    parts = {}
    for name, r in roles.items():
        if r.role not in MATRIX_ROLES:
            continue
        stated = getattr(named[name], "_soaplab_part", None)
        if stated is not None:
            if stated not in PARTS:
                raise ValueError(f"unknown part {stated!r} in a _soaplab_part attribute; "
                                 f"parts are {', '.join(PARTS)}")
            parts[name] = Part(stated, "explicit")
        elif structure is not None:
            parts[name] = _placed(name, *structure)
        else:
            parts[name] = _named_part(name)
    return parts


def _blocks(model: nn.Module) -> tuple[set[str], set[str], set[str], str] | None:
    """(block module names, attention module names, names of the modules that are or hold
    one, evidence), from Hugging Face's metadata, else module structure; None where neither
    finds attention."""
    modules = dict(model.named_modules())
    recorded = getattr(model, "_can_record_outputs", None) or {}
    classes = {key: getattr(v, "target_class", v) for key, v in recorded.items()}
    cores_cls = tuple(c for k, c in classes.items() if "attention" in k and isinstance(c, type))
    block_cls = classes.get("hidden_states")
    if cores_cls and isinstance(block_cls, type):
        cores = {n for n, m in modules.items() if isinstance(m, cores_cls)}
        blocks = {n for n, m in modules.items() if isinstance(m, block_cls)}
        evidence = "metadata"
    else:
        cores = {n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention) or
                 any(isinstance(getattr(m, a, None), int) for a in _HEAD_COUNTS)}
        blocks = set()
        evidence = "module"
    cores.discard("")  # the model itself is no branch of a block
    if not cores:
        return None
    holders = {".".join(n.split(".")[:i]) for n in cores for i in range(1, n.count(".") + 2)}
    if evidence == "module":  # a layer of a ModuleList/Sequential that holds attention
        blocks = {_join(n, child) for n, m in modules.items()
                  if isinstance(m, (nn.ModuleList, nn.Sequential))
                  for child, _ in m.named_children() if _join(n, child) in holders - cores}
    return blocks, cores, holders, evidence


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _placed(name: str, blocks: set[str], cores: set[str], holders: set[str],
            evidence: str) -> Part:
    """The part of ``name`` in the block it sits in: the block's child that holds attention is
    the attention branch, its other children the MLP."""
    path = name.split(".")[:-1]
    prefixes = [".".join(path[:i]) for i in range(1, len(path) + 1)]
    block = next((i for i, pre in enumerate(prefixes) if pre in blocks), None)
    if block is None:
        inside = any(pre in cores for pre in prefixes)
        return Part(ATTENTION if inside else OTHER, evidence)
    branch = prefixes[block + 1] if block + 1 < len(prefixes) else None
    return Part(ATTENTION if branch in holders else MLP, evidence)


def _named_part(name: str) -> Part:
    """The last resort, flagged: attention or MLP module names on the parameter's path."""
    path = name.split(".")[:-1]
    if any(step in _ATTENTION_NAMES for step in path):
        return Part(ATTENTION, "name")
    if any(step in _MLP_NAMES for step in path):
        return Part(MLP, "name")
    return Part(OTHER, "unknown")


def decay_groups(model: nn.Module, weight_decay: float | None,
                 overrides: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The trainable parameters as param groups, vectors without weight decay.

    ``weight_decay`` None means the optimizer's default, which then applies to all but the
    vectors. With 0 (the experiments' setting) nothing decays: one group, in the model's order,
    as ``model.parameters()`` gives it, so runs and checkpoints made that way stay as they were.
    """
    if weight_decay == 0:
        return [{"params": [p for p in unwrap(model).parameters() if p.requires_grad]}]
    roles = infer_roles(model, overrides)
    named = dict(unwrap(model).named_parameters())
    groups = []
    for vectors in (False, True):
        names = [n for n, r in roles.items() if (r.role == VECTOR) == vectors]
        if names:
            groups.append({"params": [named[n] for n in names], "param_names": names,
                           **({"weight_decay": 0.0} if vectors else {})})
    return groups


def role_groups(model: nn.Module, weight_decay: float | None = None,
                overrides: Mapping[str, str] | None = None, parts: bool = False
                ) -> list[dict[str, Any]]:
    """Param groups by role for a composite optimizer (``muon``, ``soap_hidden``):
    ``role="hidden"``, ``"stack"``, then ``"other"``, each in the model's order; unless
    ``weight_decay`` is 0, vectors get a group of their own (``"vector"``) without decay.
    With ``parts`` (``soap_muon``), the hidden and stack groups are split by their part of the
    block (:func:`infer_parts`), which each such group names as ``part``."""
    roles = infer_roles(model, overrides)
    where = _parts(model, roles) if parts else {}
    named = dict(unwrap(model).named_parameters())
    split_vectors = weight_decay != 0
    by_key: dict[tuple[str, str | None], list[torch.Tensor]] = {}
    for n, r in roles.items():
        role = r.role if r.role in MATRIX_ROLES or (split_vectors and r.role == VECTOR) \
            else "other"
        part = where[n].part if n in where else None
        by_key.setdefault((role, part), []).append(named[n])
    keys = [(role, part) for role in (HIDDEN, STACK)
            for part in (PARTS if parts else (None,))] + [("other", None),
                                                                     (VECTOR, None)]
    groups = [{"params": by_key[k], "role": k[0], **({"part": k[1]} if k[1] else {})}
              for k in keys if k in by_key]
    for g in groups:
        if g["role"] == VECTOR:
            g["weight_decay"] = 0.0
    return groups


def describe_roles(model: nn.Module, optimizer_name: str,
                   overrides: Mapping[str, str] | None = None, **kwargs: Any) -> str:
    """A markdown table, one row per trainable parameter: name, shape, role, the evidence for
    it (guesses end in ``?``: check them), the optimizer that updates it and its weight decay,
    read from ``soaplab.optimizer(optimizer_name, model, roles=overrides, **kwargs)``. For an
    optimizer that splits hidden matrices by their part of the block (``soap_muon``), a
    ``part`` column says which, with its evidence."""
    from soaplab.registry import entry, optimizer

    opt = optimizer(optimizer_name, model, roles=overrides, **kwargs)
    routes = opt.routes() if hasattr(opt, "routes") else \
        ((p, opt, g) for g in opt.param_groups for p in g["params"])
    route = {id(p): (type(o).__name__, g.get("weight_decay", 0.0)) for p, o, g in routes}
    roles = infer_roles(model, overrides)
    where = _parts(model, roles) if entry(optimizer_name).parts else None
    rows = [("parameter", "shape", "role", "evidence") + (("part",) if where is not None else ())
            + ("optimizer", "weight decay")]
    named = dict(unwrap(model).named_parameters())
    for name, r in roles.items():
        updater, decay = route[id(named[name])]
        part = where.get(name) if where is not None else None
        column = (f"{part.part} ({part.evidence}{'?' if part.guessed else ''})" if part else "",)
        rows.append((name, "x".join(map(str, named[name].shape)) or "scalar", r.role,
                     r.evidence + ("?" if r.guessed else "")) +
                    (column if where is not None else ()) + (updater, f"{decay:g}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
