"""MLP layers (``-``): a width keeps the first ``intermediate_size`` FFN neurons — rows of ``up_proj`` (and of
``gate_proj`` in the gated SiLU MLP of Llama / Qwen, ``mlp_type = "swiglu"``) and columns of ``down_proj``.

Worked example — FFN 4, hidden 3, gated, keeping 2 neurons and hidden 2: ``gate_proj`` and ``up_proj`` keep rows
[0, 1] and columns [0, 1]; ``down_proj`` keeps rows [0, 1] and columns [0, 1]."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import LayerKind, Width, width_fields
from .layout import Dim, Layout, Run

if TYPE_CHECKING:
    from ..config import ModelConfig


# Bytes saved for backward per token, by precision mode ("fp32": fp32 weights; "autocast": fp32 weights under bf16
# autocast; "bf16": bf16 weights, as FSDP2's MixedPrecisionPolicy runs them), as coefficients of the widths. Counted
# with torch.autograd.graph.saved_tensors_hooks on this code, least-squares over 11 Mamba, 7 attention and 4 MLP
# shapes (Mamba and MLP within 5 %, attention 15 %; bench/bench_plan.py).
# Coefficients of d and the FFN width f.
SAVED_BYTES = {"fp32": (12.0, 8.0), "autocast": (10.0, 4.0), "bf16": (10.0, 4.0)}


@dataclass(frozen=True)
class MlpWidth:
    """Kept prefix of FFN neurons."""

    intermediate_size: int


class MlpKind(LayerKind):
    char, name, width = "-", "mlp", MlpWidth
    mixes_tokens = False
    module = "mlp:MLP"
    fields = {"intermediate_size": "ffn"}
    scores = {"intermediate_size": "neuron"}
    uniform_keywords = {"intermediate_size": "intermediate_size"}
    prune_grid = {"intermediate_size": "fill"}

    def full_width(self, config: ModelConfig, k: int) -> MlpWidth:
        return MlpWidth(config.intermediate_sizes_list()[k])

    def config_fields(self, config: ModelConfig, widths: list[Width]) -> dict[str, Any]:
        return {"intermediate_size": [w.intermediate_size for w in widths]} if widths else {}

    def inner(self, config: ModelConfig, full: MlpWidth, width: Width | Mapping[str, Any] | None = None) -> Run:
        return Run.prefix(full.intermediate_size, width_fields(width or full)["intermediate_size"],
                          "intermediate_size")

    def saved_bytes_per_token(self, config: ModelConfig, width: MlpWidth, hidden: int, scan_chunk: int, mode: str,
                              documents: float) -> float:
        c = SAVED_BYTES[mode]
        # The gated MLP saves its gate and up outputs and their product: about twice the FFN-width term (an
        # estimate, not fitted like the squared-ReLU coefficients).
        return c[0] * hidden + c[1] * width.intermediate_size * (2 if config.mlp_type == "swiglu" else 1)

    def layout(self, config: ModelConfig, full: MlpWidth, width: Width | Mapping[str, Any], hidden: Any) -> Layout:
        f = Dim.of(self.inner(config, full, width))
        hid = Dim.of(Run.prefix(config.hidden_size, hidden, "hidden"))
        gated = config.mlp_type == "swiglu"
        out: Layout = {"gate_proj.weight": (f, hid)} if gated else {}
        out.update({"up_proj.weight": (f, hid), "down_proj.weight": (hid, f)})
        if config.mlp_bias:
            if gated:
                out["gate_proj.bias"] = (f,)
            out["up_proj.bias"], out["down_proj.bias"] = (f,), (hid,)
        return out


MLP_KIND = MlpKind()
