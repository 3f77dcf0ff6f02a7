"""The weight update ΔW of each adapter kind, from its tensors, and DoRA's weight decomposition.

Notation: W is a module's weight, (out, in) for a Linear and (out, in, kh, kw) for a convolution;
``alpha`` is the file's per-module alpha, ``r`` the rank. Every update is computed in float32 and
scaled as its format defines, so that the patched weight is ``W + s · ΔW`` for a user scale ``s``
(DoRA: see ``DoRA``).

- LoRA (Hu et al. 2021, eq. 3 and sec. 4.1): ΔW = alpha/r · up @ down. A convolution's down has the
  kernel (LoCon); the Tucker form of LoCon (``lora_mid``, Kim et al. 2016's Tucker-2 of the kernel, as
  LyCORIS writes it) is ΔW[p, q, k, l] = alpha/r · Σ_ij up[p, i] mid[i, j, k, l] down[j, q].
- LoHa (Hyeon-Woo et al. 2022, FedPara, eq. 2): ΔW = alpha/r · (w1a @ w1b) ⊙ (w2a @ w2b), r the rank of
  w1b; with ``hada_t1``/``hada_t2`` each factor is the Tucker product above (w_a then (r, out)).
- LoKr (Yeh et al. 2023, LyCORIS, eq. 5): ΔW = scale · w1 ⊗ w2 (Kronecker product), each factor
  full (``lokr_w1``) or low rank (``lokr_w1_a @ lokr_w1_b``; w2 also Tucker with ``lokr_t2``).
  As LyCORIS and ComfyUI define it, scale = alpha/r only where a factor is low rank (r that of w2 when
  w2 is low rank, else of w1), and 1 when both factors are full (their alpha is then ignored).
- Full and norm differences (LyCORIS ``diff``/``diff_b``, ``w_norm``/``b_norm``): ΔW = diff, Δb = diff_b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

Shape = tuple[int, ...]


class BadTensors(Exception):
    """Tensors of one module that do not form an update: ``key`` is the one to name, ``reason`` completes "key K ..."."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key, self.reason = key, reason


@dataclass
class Tensors:
    """One module's tensors from a file, by kohya tensor name, each with its key (for errors)."""

    found: dict[str, tuple[str, torch.Tensor]]

    def __contains__(self, name: str) -> bool:
        return name in self.found

    def get(self, name: str) -> torch.Tensor | None:
        return self.found[name][1] if name in self.found else None

    def key(self, name: str) -> str:
        return self.found[name][0]

    def any_key(self) -> str:
        return next(iter(self.found.values()))[0]

    def need(self, name: str, kind: str) -> torch.Tensor:
        if name not in self.found:
            raise BadTensors(self.any_key(), f"has no {name!r} beside it, which {kind} needs; the file is incomplete")
        return self.found[name][1]

    def dims(self, name: str, *allowed: int) -> torch.Tensor:
        tensor = self.found[name][1]
        if tensor.dim() not in allowed:
            wanted = " or ".join(f"{n}-D" for n in allowed)
            raise BadTensors(self.key(name), f"has shape {tuple(tensor.shape)}; a {name} weight is {wanted}")
        return tensor


def _matmul_shape(tensors: Tensors, a: str, b: str) -> Shape:
    """The shape of ``a @ b`` (both flattened to 2-D), after checking that their ranks agree."""
    left, right = tensors.get(a).flatten(1), tensors.get(b).flatten(1)
    if left.shape[1] != right.shape[0]:
        raise BadTensors(tensors.key(a), f"has rank {left.shape[1]} but {tensors.key(b)!r} has rank {right.shape[0]}; they must agree")
    return (left.shape[0], right.shape[1])


def _tucker_shape(tensors: Tensors, core: str, a: str, b: str) -> Shape:
    """The shape of the Tucker product of ``core`` (r_a, r_b, kh, kw) with ``a`` (r_a, out) and ``b`` (r_b, in)."""
    t, wa, wb = tensors.dims(core, 4), tensors.dims(a, 2), tensors.dims(b, 2)
    if (t.shape[0], t.shape[1]) != (wa.shape[0], wb.shape[0]):
        raise BadTensors(
            tensors.key(core), f"has shape {tuple(t.shape)}, which does not join {tensors.key(a)!r} {tuple(wa.shape)} "
            f"and {tensors.key(b)!r} {tuple(wb.shape)} (Tucker: (rank a, rank b, kh, kw) with a (rank a, out), b (rank b, in))",
        )  # fmt: skip
    return (wa.shape[1], wb.shape[1], *t.shape[2:])


def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W[p, q, k, l] = Σ_ij a[i, p] core[i, j, k, l] b[j, q]: LyCORIS's Tucker form of a convolution weight."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, a, b)


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device, torch.float32)


def rank_scale(alpha: float | None, rank: int) -> float:
    """alpha / rank (Hu et al. 2021, sec. 4.1); a file without alpha means alpha = rank."""
    return 1.0 if alpha is None else alpha / rank


@dataclass
class LoRA:
    kind: ClassVar[str] = "LoRA"
    down: torch.Tensor  # (r, in) or (r, in, kh, kw); (r, in, 1, 1) with mid
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    mid: torch.Tensor | None  # (r, r, kh, kw): LoCon's Tucker core
    alpha: float | None

    @classmethod
    def read(cls, tensors: Tensors, alpha: float | None) -> LoRA:
        down = tensors.need("lora_down.weight", cls.kind)
        up = tensors.need("lora_up.weight", cls.kind)
        for name in ("lora_down.weight", "lora_up.weight"):
            tensors.dims(name, 2, 4)
        if down.shape[0] < 1:
            raise BadTensors(tensors.key("lora_down.weight"), "has rank 0; a LoRA needs rank 1 or more")
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise BadTensors(tensors.key("lora_up.weight"), f"has shape {tuple(up.shape)}; a LoRA up weight is (out, rank) or (out, rank, 1, 1)")
        lora = cls(down, up, tensors.get("lora_mid.weight"), alpha)
        lora.shape(tensors)
        return lora

    def shape(self, tensors: Tensors) -> Shape:
        if self.mid is None:
            _matmul_shape(tensors, "lora_up.weight", "lora_down.weight")
            return (self.up.shape[0], *self.down.shape[1:])
        mid = tensors.dims("lora_mid.weight", 4)
        if tuple(mid.shape[:2]) != (self.up.shape[1], self.down.shape[0]) or self.down[0, 0].numel() != 1:
            raise BadTensors(
                tensors.key("lora_mid.weight"), f"has shape {tuple(mid.shape)}, which does not join up {tuple(self.up.shape)} "
                f"and down {tuple(self.down.shape)}; Tucker LoCon is up (out, r), mid (r, r, kh, kw), down (r, in, 1, 1)",
            )  # fmt: skip
        return (self.up.shape[0], self.down.shape[1], *mid.shape[2:])

    def delta(self, device: torch.device) -> torch.Tensor:
        up, down = _on(self.up.flatten(1), device), _on(self.down.flatten(1), device)
        scale = rank_scale(self.alpha, down.shape[0])
        if self.mid is None:
            return scale * (up @ down).reshape(up.shape[0], *self.down.shape[1:])
        return scale * tucker(_on(self.mid, device), up.T, down)


@dataclass
class LoHa:
    kind: ClassVar[str] = "LoHa"
    w1a: torch.Tensor  # (out, r), or (r, out) with t1
    w1b: torch.Tensor  # (r, in·kh·kw), or (r, in) with t1
    w2a: torch.Tensor
    w2b: torch.Tensor
    t1: torch.Tensor | None  # (r, r, kh, kw)
    t2: torch.Tensor | None
    alpha: float | None

    @classmethod
    def read(cls, tensors: Tensors, alpha: float | None) -> LoHa:
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        factors = [tensors.need(name, cls.kind) for name in names]
        if ("hada_t1" in tensors) != ("hada_t2" in tensors):
            raise BadTensors(tensors.any_key(), "has one of hada_t1 and hada_t2 but not the other; a Tucker LoHa needs both")
        loha = cls(*factors, tensors.get("hada_t1"), tensors.get("hada_t2"), alpha)
        loha.shape(tensors)
        return loha

    def shape(self, tensors: Tensors) -> Shape:
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            tensors.dims(name, 2)
        if self.t1 is None:
            first, second = _matmul_shape(tensors, "hada_w1_a", "hada_w1_b"), _matmul_shape(tensors, "hada_w2_a", "hada_w2_b")
        else:
            first = _tucker_shape(tensors, "hada_t1", "hada_w1_a", "hada_w1_b")
            second = _tucker_shape(tensors, "hada_t2", "hada_w2_a", "hada_w2_b")
        if first != second:
            raise BadTensors(tensors.key("hada_w2_a"), f"makes a factor of shape {second} but hada_w1 one of {first}; they must agree")
        return first

    def delta(self, device: torch.device) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (_on(w, device) for w in (self.w1a, self.w1b, self.w2a, self.w2b))
        if self.t1 is None:
            product = (w1a @ w1b) * (w2a @ w2b)
        else:
            product = tucker(_on(self.t1, device), w1a, w1b) * tucker(_on(self.t2, device), w2a, w2b)
        return rank_scale(self.alpha, self.w1b.shape[0]) * product


@dataclass
class LoKr:
    kind: ClassVar[str] = "LoKr"
    w1: torch.Tensor | None  # (a, c), or None for w1a @ w1b
    w1a: torch.Tensor | None  # (a, r)
    w1b: torch.Tensor | None  # (r, c)
    w2: torch.Tensor | None  # (b, d) or (b, d, kh, kw), or None for w2a @ w2b or the Tucker form
    w2a: torch.Tensor | None  # (b, r), or (r, b) with t2
    w2b: torch.Tensor | None  # (r, d) or (r, d·kh·kw), or (r, d) with t2
    t2: torch.Tensor | None  # (r, r, kh, kw)
    alpha: float | None

    @classmethod
    def read(cls, tensors: Tensors, alpha: float | None) -> LoKr:
        for factor in ("lokr_w1", "lokr_w2"):
            full, low = factor in tensors, f"{factor}_a" in tensors or f"{factor}_b" in tensors
            if full == low:
                problem = "both" if full else "neither"
                raise BadTensors(tensors.any_key(), f"has {problem} {factor} and {factor}_a/_b; LoKr needs exactly one form of {factor}")
            if low:
                tensors.need(f"{factor}_a", cls.kind), tensors.need(f"{factor}_b", cls.kind)
        if "lokr_t2" in tensors and "lokr_w2" in tensors:
            raise BadTensors(tensors.key("lokr_t2"), "is a Tucker core beside a full lokr_w2; remove one of them")
        names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        lokr = cls(*(tensors.get(name) for name in names), alpha)
        lokr.shape(tensors)
        return lokr

    def shape(self, tensors: Tensors) -> Shape:
        w1 = tuple(tensors.dims("lokr_w1", 2).shape) if self.w1 is not None else _matmul_shape(tensors, "lokr_w1_a", "lokr_w1_b")
        if self.w2 is not None:
            w2 = tuple(tensors.dims("lokr_w2", 2, 4).shape)
        elif self.t2 is not None:
            w2 = _tucker_shape(tensors, "lokr_t2", "lokr_w2_a", "lokr_w2_b")
        else:
            w2 = _matmul_shape(tensors, "lokr_w2_a", "lokr_w2_b")
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])

    @property
    def scale(self) -> float:
        """alpha / r where a factor is low rank (w2's rank first), else 1 (LyCORIS's LokrModule, ComfyUI's LoKr)."""
        low_rank = self.w2b if self.w2 is None else self.w1b
        if low_rank is None or self.alpha is None:
            return 1.0
        return self.alpha / low_rank.shape[0]

    def delta(self, device: torch.device) -> torch.Tensor:
        w1 = _on(self.w1, device) if self.w1 is not None else _on(self.w1a, device) @ _on(self.w1b, device)
        if self.w2 is not None:
            w2 = _on(self.w2, device)
        elif self.t2 is not None:
            w2 = tucker(_on(self.t2, device), _on(self.w2a, device), _on(self.w2b, device))
        else:
            w2 = _on(self.w2a, device) @ _on(self.w2b, device)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return self.scale * torch.kron(w1, w2)


@dataclass
class Difference:
    """LyCORIS's full (``diff``, ``diff_b``) or norm (``w_norm``, ``b_norm``) update: ΔW and Δb as stored."""

    kind: str  # "full diff" or "norm diff"
    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def read(cls, tensors: Tensors, kind: str) -> Difference:
        weight_name, bias_name = ("diff", "diff_b") if kind == "full diff" else ("w_norm", "b_norm")
        return cls(kind, tensors.need(weight_name, kind), tensors.get(bias_name))

    def shape(self, tensors: Tensors) -> Shape:
        return tuple(self.weight.shape)

    def delta(self, device: torch.device) -> torch.Tensor:
        return _on(self.weight, device)


Update = LoRA | LoHa | LoKr | Difference


@dataclass
class DoRA:
    """Weight-decomposed adaptation (Liu et al. 2024, eq. 5): W' = m · V / ||V|| with V = W + ΔW.

    The norm is taken per output row (``axis="out"``: peft's ``lora_magnitude_vector``, LyCORIS with
    ``wd_on_out``), or per input column (``axis="in"``: LyCORIS's and kohya's default ``dora_scale`` of
    shape (1, in, 1, 1)). As in LyCORIS, float32's epsilon is added to the norm.
    """

    magnitude: torch.Tensor
    axis: str  # "out" or "in"
    key: str

    @classmethod
    def read(cls, key: str, magnitude: torch.Tensor, weight_shape: Shape, peft: bool) -> DoRA:
        out, into = weight_shape[0], weight_shape[1] if len(weight_shape) > 1 else 1
        if magnitude.numel() == out and (peft or magnitude.shape[0] == out):
            return cls(magnitude, "out", key)
        if not peft and magnitude.numel() == into and magnitude.dim() > 1 and magnitude.shape[0] == 1:
            return cls(magnitude, "in", key)
        wanted = f"({out},) for peft" if peft else f"({out}, 1, ...) or (1, {into}, ...)"
        raise BadTensors(key, f"has shape {tuple(magnitude.shape)}, which is no DoRA magnitude of the weight {weight_shape}; it must be {wanted}")

    def decompose(self, adapted: torch.Tensor) -> torch.Tensor:
        """m · V / ||V||, ``adapted`` = V = W + ΔW (float32)."""
        dims = [d for d in range(adapted.dim()) if d != (0 if self.axis == "out" else 1)]
        norm = torch.linalg.vector_norm(adapted, dim=dims, keepdim=True) + torch.finfo(torch.float32).eps
        magnitude = _on(self.magnitude, adapted.device).reshape(norm.shape)
        return adapted * (magnitude / norm)


def fits(shape: Shape, weight_shape: Shape) -> bool:
    """Whether an update of ``shape`` is one of ``weight_shape``: the same, one with 1x1 kernels dropped
    (kohya stores a 1x1 conv's LoRA as 4-D and a linear projection's as 2-D), or (out, in·kh·kw)."""
    if _without_1x1(shape) == _without_1x1(weight_shape):
        return True
    return len(shape) == 2 and len(weight_shape) > 2 and shape == (weight_shape[0], math.prod(weight_shape[1:]))


def _without_1x1(shape: Shape) -> Shape:
    return tuple(shape[:2]) if tuple(shape[2:]) == (1, 1) else tuple(shape)
