"""Plain PyTorch forward of the HF Ling-2.0 and Ring-linear-2.0 models, the yardstick for ring_train.

Ling-2.0 (`BailingMoeV2ForCausalLM`, model_type `bailing_moe_v2`) is all softmax attention;
Ring-linear-2.0 (`BailingMoeLinearV2ForCausalLM`, model_type `bailing_moe_linear`) replaces most
attention layers with lightning attention. Both read an HF config dict and an HF-named state dict
(ARCH_SPEC §4.1/§4.2) and run one op after another in a single process, in fp32 or float64, with
lightning attention as its step-by-step recurrence. Nothing here is fused or parallel: every line
should be checkable against ARCH_SPEC §2-§3 by reading it.

Shapes: B batch, T tokens, d hidden_size, H attention heads, KV key/value heads of softmax layers,
D head_dim, E experts, V vocab.
"""

import math

import torch
import torch.nn.functional as F

LING_MODEL_TYPE = "bailing_moe_v2"
RING_LINEAR_MODEL_TYPE = "bailing_moe_linear"


# ----------------------------------------------------------------------------- config

def head_dims(config: dict) -> tuple[int, int, int]:
    """(H, KV, D); linear layers are MHA with H key/value heads, softmax layers GQA with KV."""
    num_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
    return num_heads, config["num_key_value_heads"], head_dim


def is_softmax_layer(layer_idx: int, config: dict) -> bool:
    """HF rule (§2.1): softmax iff (l+1) % layer_group_size == 0, or l is a tail layer past the last full group."""
    if config["model_type"] == LING_MODEL_TYPE:
        return True
    group = config["layer_group_size"]
    last_full_group_end = (config["num_hidden_layers"] // group) * group
    return (layer_idx + 1) % group == 0 or layer_idx >= last_full_group_end


def check_supported(config: dict) -> None:
    """Refuse config features this reference does not model rather than silently ignoring them."""
    if config["model_type"] not in (LING_MODEL_TYPE, RING_LINEAR_MODEL_TYPE):
        raise ValueError(f"model_type={config['model_type']!r}: expected {LING_MODEL_TYPE!r} "
                         f"or {RING_LINEAR_MODEL_TYPE!r}")
    for field in ("use_qkv_bias", "use_bias", "tie_word_embeddings"):
        if config.get(field, False):
            raise ValueError(f"{field}=true is not modelled; released Ling/Ring configs set it false")
    if config.get("rope_scaling") is not None:
        raise ValueError("rope_scaling is not modelled; set rope_scaling=null")
    if config.get("score_function", "sigmoid") != "sigmoid":
        raise ValueError(f"score_function={config['score_function']!r}: only 'sigmoid' is modelled")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config['hidden_act']!r}: only 'silu' is modelled")
    if config.get("num_nextn_predict_layers", 0) > 1:
        raise ValueError("num_nextn_predict_layers > 1 is not modelled (ARCH_SPEC §3.5 describes one MTP layer)")


# ----------------------------------------------------------------------------- small ops

def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., n] divided by its root mean square over the last dim (no mean subtraction, no weight)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: x [..., n], weight [n] -> [..., n]."""
    return rms_normalize(x, eps) * weight


def group_rms_norm(x: torch.Tensor, weight: torch.Tensor, num_groups: int, eps: float) -> torch.Tensor:
    """g_norm (§2.3 step 8): x [..., H*D] viewed [..., num_groups, H*D/num_groups], each group
    RMS-normalised on its own, then times the full-width weight [H*D] (not shared across groups)."""
    grouped = x.unflatten(-1, (num_groups, -1))
    return rms_normalize(grouped, eps).flatten(-2) * weight


def swiglu_mlp(x: torch.Tensor, p: dict) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)); x [..., d] -> [..., d]; p holds gate_proj/up_proj/down_proj weights."""
    return (F.silu(x @ p["gate_proj.weight"].T) * (x @ p["up_proj.weight"].T)) @ p["down_proj.weight"].T


def rope_cos_sin(num_tokens: int, config: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, R] for positions 0..T-1 over the rotary dims R = int(D * partial_rotary_factor).

    partial_rotary_factor defaults to 1.0 when absent, as the HF config class does (§1.3)."""
    rotary_dim = int(head_dims(config)[2] * config.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, rotary_dim, 2, dtype=dtype) / rotary_dim)
    angles = torch.arange(num_tokens, dtype=dtype)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # NeoX layout: frequency i drives dims i and i + R/2
    return angles.cos(), angles.sin()


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on dims [0, R) of every head, dims [R, D) untouched. x [B,T,heads,D], cos/sin [T,R]."""
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rot.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([rot * cos + rotated_half * sin, rest], dim=-1)


# ----------------------------------------------------------------------------- lightning attention decay

def alibi_base_slopes(num_heads: int) -> torch.Tensor:
    """Per-head base slopes [H] (float64), §2.4: 2^(-8(h+1)/H) for power-of-two H, else the ALiBi
    interleave slopes(c) + slopes(2c)[0::2][:H-c] with c the largest power of two below H."""
    def power_of_two_slopes(n: int) -> list[float]:
        ratio = 2.0 ** (-8.0 / n)
        return [ratio ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two_slopes(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two_slopes(closest) + power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float64)


def layer_decay_factor(layer_idx: int, num_layers: int, variant: str = "A") -> float:
    """Per-layer slope factor f(l) over the 0-based global layer index (softmax layers counted), §2.4.

    "A" (SGLang, vLLM, AReno, Megatron): 1 - l/(L-1) + 1e-5.
    "B" (HF remote code as quoted by ports): 1 - (l-1)/(L-1) + 1e-5."""
    if variant not in ("A", "B"):
        raise ValueError(f"decay_variant={variant!r}: expected 'A' or 'B'")
    if num_layers <= 1:
        return 1.0 + 1e-5
    shift = 0 if variant == "A" else 1
    return 1.0 - (layer_idx - shift) / (num_layers - 1) + 1e-5


def lightning_slopes(num_heads: int, layer_idx: int, num_layers: int, variant: str = "A") -> torch.Tensor:
    """slope_{l,h} [H] (float64, positive); the per-head decay is lambda_h = exp(-slope_{l,h})."""
    return alibi_base_slopes(num_heads) * layer_decay_factor(layer_idx, num_layers, variant)


def lightning_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
                                  doc_start: torch.Tensor | None = None) -> torch.Tensor:
    """Causal lightning attention by its recurrence, one token at a time (§2.3 step 6).

    S_t = lambda_h S_{t-1} + k_t^T v_t (S_0 = 0, S in R^{D x D}), o_t = (D^-0.5 q_t) S_t, lambda_h = exp(-slope_h).
    q, k, v [B,T,H,D]; slope [H]; doc_start [T] bool, True where a packed document begins: the
    state is zeroed before that token so no document sees another. Returns o [B,T,H,D]."""
    batch, num_tokens, num_heads, head_dim = q.shape
    decay = torch.exp(-slope.to(q.dtype))[None, :, None, None]
    scale = head_dim ** -0.5
    state = q.new_zeros(batch, num_heads, head_dim, head_dim)
    outputs = []
    for t in range(num_tokens):
        if doc_start is not None and doc_start[t]:
            state = torch.zeros_like(state)
        state = decay * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(torch.einsum("bhd,bhde->bhe", scale * q[:, t], state))
    return torch.stack(outputs, dim=1)


# ----------------------------------------------------------------------------- attention layers

def qk_norm_and_rope(q: torch.Tensor, k: torch.Tensor, p: dict, config: dict, rope: tuple) -> tuple:
    """Per-head RMSNorm over D (weights [D] shared by heads), then partial RoPE; q, k [B,T,heads,D]."""
    if config["use_qk_norm"]:
        q = rms_norm(q, p["query_layernorm.weight"], config["rms_norm_eps"])
        k = rms_norm(k, p["key_layernorm.weight"], config["rms_norm_eps"])
    return apply_partial_rope(q, *rope), apply_partial_rope(k, *rope)


def softmax_attention(x: torch.Tensor, p: dict, config: dict, rope: tuple, allowed: torch.Tensor) -> torch.Tensor:
    """GQA softmax attention (§3.1). x [B,T,d]; allowed [T,T] bool (query, key) -> [B,T,d].

    query_key_value rows are [Q (H heads) | K (KV heads) | V (KV heads)], each head-major."""
    num_heads, num_kv_heads, head_dim = head_dims(config)
    batch, num_tokens, _ = x.shape
    qkv = (x @ p["query_key_value.weight"].T).view(batch, num_tokens, num_heads + 2 * num_kv_heads, head_dim)
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=2)
    q, k = qk_norm_and_rope(q, k, p, config, rope)
    # HF repeat_kv: query head h reads KV head h // (H/KV).
    k = k.repeat_interleave(num_heads // num_kv_heads, dim=2)
    v = v.repeat_interleave(num_heads // num_kv_heads, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(head_dim)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = torch.einsum("bhts,bshd->bthd", probs, v).reshape(batch, num_tokens, num_heads * head_dim)
    return out @ p["dense.weight"].T


def linear_attention(x: torch.Tensor, p: dict, config: dict, rope: tuple, slope: torch.Tensor,
                     doc_start: torch.Tensor) -> torch.Tensor:
    """Lightning-attention layer (§2.3 steps 1-10). x [B,T,d] (the normed layer input); slope [H]
    -> [B,T,d]. query_key_value rows are [Q | K | V], H heads each (MHA)."""
    num_heads, _, head_dim = head_dims(config)
    batch, num_tokens, _ = x.shape
    qkv = x @ p["query_key_value.weight"].T
    if config.get("linear_silu", False):
        qkv = F.silu(qkv)  # on q, k and v alike
    q, k, v = qkv.view(batch, num_tokens, 3 * num_heads, head_dim).split(num_heads, dim=2)
    q, k = qk_norm_and_rope(q, k, p, config, rope)
    out = lightning_attention_recurrent(q, k, v, slope, doc_start).reshape(batch, num_tokens, num_heads * head_dim)
    out = group_rms_norm(out, p["g_norm.weight"], config["group_norm_size"], config["rms_norm_eps"])
    # The output gate reads the layer input x, not the attention output, and is not normalised.
    out = out * torch.sigmoid(x @ p["g_proj.weight"].T)
    return out @ p["dense.weight"].T


# ----------------------------------------------------------------------------- MoE

def route_tokens(x: torch.Tensor, gate_weight: torch.Tensor, expert_bias: torch.Tensor | None,
                 config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited sigmoid top-k router (§3.2). x [N,d], gate_weight [E,d], expert_bias [E] or None.

    Returns (expert_idx [N,k], weights [N,k]). The bias only steers selection; weights come from the
    unbiased sigmoid scores, normalised over the chosen k (norm_topk_prob) and times routed_scaling_factor.
    Computed in at least fp32 whatever the weights' dtype (router_dtype fp32)."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    scores = torch.sigmoid(x.to(compute_dtype) @ gate_weight.to(compute_dtype).T)  # [N,E]
    biased = scores if expert_bias is None else scores + expert_bias.to(compute_dtype)
    num_tokens, num_experts = scores.shape
    num_groups = config["n_group"]
    if num_experts % num_groups or num_experts // num_groups < 2:
        raise ValueError(f"n_group={num_groups}: num_experts={num_experts} must split into groups of >= 2 experts")
    group_scores = biased.view(num_tokens, num_groups, -1).topk(2, dim=-1).values.sum(dim=-1)  # [N, n_group]
    kept_groups = group_scores.topk(config["topk_group"], dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, kept_groups, True)
    expert_mask = group_mask.repeat_interleave(num_experts // num_groups, dim=1)  # [N,E]
    expert_idx = biased.masked_fill(~expert_mask, float("-inf")).topk(config["num_experts_per_tok"], dim=-1).indices
    weights = scores.gather(1, expert_idx)
    if config["norm_topk_prob"]:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return expert_idx, weights * config["routed_scaling_factor"]


def moe_block(x: torch.Tensor, p: dict, config: dict) -> torch.Tensor:
    """Routed SwiGLU experts plus the shared expert (§3.2). x [B,T,d] -> [B,T,d]."""
    tokens = x.reshape(-1, x.shape[-1])
    expert_bias = p["gate.expert_bias"] if config["moe_router_enable_expert_bias"] else None
    expert_idx, weights = route_tokens(tokens, p["gate.weight"], expert_bias, config)
    out = torch.zeros_like(tokens)
    for expert in range(config["num_experts"]):
        token_ids, slot = (expert_idx == expert).nonzero(as_tuple=True)
        expert_out = swiglu_mlp(tokens[token_ids], sub_dict(p, f"experts.{expert}."))
        out.index_add_(0, token_ids, weights[token_ids, slot, None].to(out.dtype) * expert_out)
    if config["num_shared_experts"] > 0:
        out = out + swiglu_mlp(tokens, sub_dict(p, "shared_experts."))
    return out.view_as(x)


# ----------------------------------------------------------------------------- model

def sub_dict(params: dict, prefix: str) -> dict:
    """The entries of params under prefix, with the prefix stripped from their names."""
    return {name[len(prefix):]: t for name, t in params.items() if name.startswith(prefix)}


def decoder_layer(h: torch.Tensor, p: dict, config: dict, layout: dict, *, slope: torch.Tensor | None,
                  dense_ffn: bool) -> torch.Tensor:
    """Pre-norm residual layer (§3.4); lightning attention when slope [H] is given, else softmax. h [B,T,d]."""
    eps = config["rms_norm_eps"]
    x = rms_norm(h, p["input_layernorm.weight"], eps)
    attn = sub_dict(p, "attention.")
    if slope is None:
        h = h + softmax_attention(x, attn, config, layout["rope"], layout["allowed"])
    else:
        h = h + linear_attention(x, attn, config, layout["rope"], slope, layout["doc_start"])
    x = rms_norm(h, p["post_attention_layernorm.weight"], eps)
    return h + (swiglu_mlp(x, sub_dict(p, "mlp.")) if dense_ffn else moe_block(x, sub_dict(p, "mlp."), config))


def sequence_layout(batch: int, num_tokens: int, config: dict, dtype: torch.dtype, cu_seqlens=None) -> dict:
    """What every layer needs about token positions and documents.

    rope: (cos, sin) [T,R] for positions 0..T-1 over the whole (packed) row; allowed [T,T] bool:
    causal and within one document; doc_start [T] bool. cu_seqlens (list or tensor [N+1], from 0 to T)
    packs N documents into a batch-1 row."""
    if cu_seqlens is None:
        cu_seqlens = [0, num_tokens]
    elif batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1, got {batch}")
    cu_seqlens = torch.as_tensor(cu_seqlens, dtype=torch.long)
    lengths = cu_seqlens.diff()
    if cu_seqlens[0] != 0 or cu_seqlens[-1] != num_tokens or (lengths <= 0).any():
        raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} must rise strictly from 0 to T={num_tokens}")
    doc_id = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    position = torch.arange(num_tokens)
    allowed = (position[None, :] <= position[:, None]) & (doc_id[None, :] == doc_id[:, None])
    doc_start = torch.zeros(num_tokens, dtype=torch.bool)
    doc_start[cu_seqlens[:-1]] = True
    return {"rope": rope_cos_sin(num_tokens, config, dtype), "allowed": allowed, "doc_start": doc_start}


def mtp_hidden(h_main: torch.Tensor, input_ids: torch.Tensor, weights: dict, config: dict,
               layout: dict) -> torch.Tensor:
    """The MTP layer stored as model.layers.{L} (§3.5); h_main [B,T,d] is the stack output after
    model.norm. Returns its final_layernorm output [B,T,d] for the shared lm_head.

    The MTP layer is a softmax-attention MoE layer in both model types."""
    eps = config["rms_norm_eps"]
    p = sub_dict(weights, f"model.layers.{config['num_hidden_layers']}.")
    next_ids = torch.roll(input_ids, shifts=-1, dims=-1)
    embedded = rms_norm(weights["model.word_embeddings.weight"][next_ids], p["enorm.weight"], eps)
    z = torch.cat([embedded, rms_norm(h_main, p["hnorm.weight"], eps)], dim=-1) @ p["eh_proj.weight"].T
    z = decoder_layer(z, p, config, layout, slope=None, dense_ffn=False)
    return rms_norm(z, p["final_layernorm.weight"], eps)


def reference_logits(config: dict, state_dict: dict[str, torch.Tensor], input_ids: torch.Tensor, *,
                     decay_variant: str = "A", cu_seqlens=None, dtype: torch.dtype = torch.float32) -> dict:
    """Forward pass of an HF Ling-2.0 or Ring-linear-2.0 checkpoint.

    config: HF config.json fields; state_dict: HF names (§4.1/§4.2), any float dtype;
    input_ids [B,T]; decay_variant "A" or "B" (§2.4, Ring-linear only); cu_seqlens [N+1] packs N
    documents into a batch-1 row (block-diagonal softmax mask, lightning state reset at each
    document start, RoPE positions 0..T-1 over the row); dtype: compute dtype (fp32 or float64).

    Returns {"logits": [B,T,V], "mtp_logits": [B,T,V] or None}. mtp_logits[:, t] predicts token t+2;
    its input at t is token t+1 rolled over the row, so the last position (of the row, or of each
    packed document) reads a token from outside its document and carries no meaning."""
    check_supported(config)
    weights = {name: t.to(dtype) for name, t in state_dict.items()}
    batch, num_tokens = input_ids.shape
    layout = sequence_layout(batch, num_tokens, config, dtype, cu_seqlens)
    num_layers = config["num_hidden_layers"]
    num_heads = head_dims(config)[0]

    h = weights["model.word_embeddings.weight"][input_ids]
    for layer_idx in range(num_layers):
        slope = None if is_softmax_layer(layer_idx, config) else lightning_slopes(
            num_heads, layer_idx, num_layers, decay_variant).to(dtype)
        h = decoder_layer(h, sub_dict(weights, f"model.layers.{layer_idx}."), config, layout,
                          slope=slope, dense_ffn=layer_idx < config["first_k_dense_replace"])
    h = rms_norm(h, weights["model.norm.weight"], config["rms_norm_eps"])
    lm_head = weights["lm_head.weight"]

    mtp_logits = None
    if config.get("num_nextn_predict_layers", 0) > 0:
        mtp_logits = mtp_hidden(h, input_ids, weights, config, layout) @ lm_head.T
    return {"logits": h @ lm_head.T, "mtp_logits": mtp_logits}
