"""Token log-probs and entropies from the last hidden states, a chunk of tokens at a time.

The plain way, `model(...).logits` then log-softmax, holds the whole [tokens, vocab] tensor in fp32, and autograd
keeps several such tensors until backward: with Qwen's 151,936-token vocabulary one 8,192-token micro-batch is
5 GB per copy. Here the logits of a chunk of tokens are made from the hidden states h and the output embedding W,

    z = h Wᵀ (+ b),   optionally soft-capped: z = c · tanh(z / c)   (Gemma 2)
    log p(y) = z_y - logsumexp(z),      H = logsumexp(z) - Σ_k softmax(z)_k z_k,

reduced to the two numbers per token that the losses use, and dropped; backward makes each chunk's logits again
(one more h Wᵀ, the price of never holding them) and turns the incoming gradients into those of h and W:

    ∂ log p(y) / ∂z = onehot(y) - p,    ∂H / ∂z = -p (log p + H) = -p (z - Σ_k p_k z_k),    ∂z/∂h = W,  ∂z/∂W = h.

`chunked_logprobs` is the math on tensors; `model_logprobs` runs a causal LM (HF, PEFT-wrapped or a DeepSpeed
engine, ZeRO-3 included) for its hidden states without letting it make logits, and applies it as the output
layer's forward, so that ZeRO-3 gathers that layer for it as it would for the logits.
"""

from __future__ import annotations

import torch

# One chunk's fp32 [chunk, vocab] block. Two are alive at once (logits and probabilities; the gradient is made in
# the logits' memory), so the step's peak is ~0.5 GB beyond the model's whatever the micro-batch's length. 441 tokens
# at Qwen's vocabulary (peers chunk by 512); the built-in 512-token vocabulary fits 131,072 tokens in one chunk, so
# the small models pay no loop at all.
CHUNK_BYTES = 256 << 20


def default_chunk(vocab: int) -> int:
    """Tokens per chunk: one fp32 [chunk, vocab] block of CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * vocab))


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    """One chunk's logits in fp32 (fp64 for fp64 inputs): the product in the model's dtype, as its lm_head makes it,
    then cast."""
    z = torch.nn.functional.linear(h, weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return z if softcap is None else z.div_(softcap).tanh_().mul_(softcap)  # in place: no extra [chunk, V] block


def _rowdot(a: torch.Tensor, b: torch.Tensor, width: int = 8192) -> torch.Tensor:
    """Σ_k a_k b_k of each row, [N, V] x [N, V] -> [N], a slice of the vocabulary at a time: no [N, V] product in
    between, and summed as `.sum` sums (a matmul's dot product drifts by ~1e-4 over 151,936 fp32 terms)."""
    return sum((a[:, k:k + width] * b[:, k:k + width]).sum(-1) for k in range(0, a.shape[1], width))


class _ChunkedLogprobs(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] or None, labels [N] -> (log p(labels) [N], entropy [N] or None) in
    fp32 (fp64 for fp64 inputs).

    Saves only its inputs; backward makes each chunk's logits again. Two [chunk, V] blocks are alive at once, z and
    p (three under a soft cap), hence the in-place steps."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap, with_entropy, chunk):
        n = hidden.shape[0]
        fp = torch.promote_types(hidden.dtype, torch.float32)
        logp_y = torch.empty(n, dtype=fp, device=hidden.device)
        entropy = torch.empty(n, dtype=fp, device=hidden.device) if with_entropy else None
        for s in range(0, n, chunk):
            z = _logits(hidden[s:s + chunk], weight, bias, softcap)
            lse = torch.logsumexp(z, dim=-1)
            logp_y[s:s + chunk] = z.gather(-1, labels[s:s + chunk, None]).squeeze(-1) - lse
            if with_entropy:  # H = logsumexp(z) - Σ p z
                entropy[s:s + chunk] = lse - _rowdot(torch.softmax(z, dim=-1), z)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.softcap, ctx.chunk = softcap, chunk
        ctx.set_materialize_grads(False)  # an unused entropy sends None, not zeros
        return logp_y, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        c = ctx.chunk
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None  # the weight's dtype, as a Linear's gradient
        grad_b = torch.zeros_like(bias, dtype=torch.promote_types(bias.dtype, torch.float32)) if need_b else None
        for s in range(0, hidden.shape[0], c):
            h, y = hidden[s:s + c], labels[s:s + c]
            z = _logits(h, weight, bias, ctx.softcap)
            p = torch.softmax(z, dim=-1)
            # z = c tanh(u / c) under a soft cap: dz/du = 1 - (z / c)², taken before z's memory is reused
            cap = None if ctx.softcap is None else (z / ctx.softcap).square_().neg_().add_(1)
            g_lp = grad_logp[s:s + c, None] if grad_logp is not None else p.new_zeros(len(h), 1)
            g_h = grad_entropy[s:s + c, None] if grad_entropy is not None else p.new_zeros(len(h), 1)
            # dL/dz = g_lp (onehot(y) - p) - g_H p (z - Σ p z)   [∂H/∂z = -p (log p + H) = -p (z - Σ p z)]
            #       = -p (g_lp + g_H (z - Σ p z)) + g_lp onehot(y), built in z's memory
            g = z.sub_(_rowdot(p, z)[:, None]).mul_(g_h).add_(g_lp).mul_(p).neg_().scatter_add_(-1, y[:, None], g_lp)
            del p
            if cap is not None:
                g.mul_(cap)
                del cap
            g = g.to(hidden.dtype)
            if need_h:
                grad_h[s:s + c] = g @ weight
            if need_w:
                grad_w.addmm_(g.t(), h)
            if need_b:
                grad_b += g.sum(0)
        return grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     bias: torch.Tensor | None = None, softcap: float | None = None, with_entropy: bool = False,
                     chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(labels) and (with_entropy) the entropy of each position's distribution softmax(h Wᵀ + b), in fp32,
    without holding the logits: hidden [..., H], weight [V, H], labels [...] -> ([...], [...] or None).

    `chunk_size` tokens at a time (default: a 256 MiB fp32 logits block, `default_chunk`); `softcap`: Gemma 2's
    final_logit_softcapping."""
    chunk = chunk_size or default_chunk(weight.shape[0])
    logp, entropy = _ChunkedLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1),
                                           softcap, with_entropy, chunk)
    return logp.view(labels.shape), None if entropy is None else entropy.view(labels.shape)


# ---------------------------------------------------------------------------------------------------------------------
# a causal LM's hidden states and output layer
# ---------------------------------------------------------------------------------------------------------------------
def _unwrap(model):
    """The HF model inside a DeepSpeed engine and/or a PEFT wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_hidden_state(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, H]: the final hidden states (after the last norm) of a causal LM called as usual, its lm_head applied
    to no position (`logits_to_keep` an empty index)."""
    call = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device))
    if torch.is_grad_enabled():
        # taken from the call's outputs: a DeepSpeed engine starts its backward from hooks on what it returned
        return model(**call, output_hidden_states=True).hidden_states[-1]
    # without gradients nothing else holds the layers' outputs: keep only the last one, not all of them
    held = []
    hook = _unwrap(model).get_decoder().register_forward_hook(lambda m, a, out: held.append(out.last_hidden_state))
    try:
        model(**call)
    finally:
        hook.remove()
    return held[0]


def _as_forward(module: torch.nn.Module, fn, *args):
    """fn(*args) run as `module`'s forward, for one call. The hooks on the module then treat it as the module's own
    computation: under ZeRO-3 they gather the module's parameters for it, and again when its outputs' gradients
    come back, so the weight is whole in backward and when its gradient is accumulated."""
    own = module.__dict__.get("forward")  # a wrapper someone set on the instance (accelerate's hooks do)
    module.forward = fn  # an instance attribute shadows the class's forward
    try:
        return module(*args)
    finally:
        del module.forward
        if own is not None:
            module.forward = own


def _zero3_external(module: torch.nn.Module, *params) -> None:
    """Under ZeRO-3, `module`'s hooks gather `params` too (they belong to its children)."""
    params = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if params:
        import deepspeed

        for p in params:
            deepspeed.zero.register_external_parameter(module, p)


def model_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor | None = None, with_entropy: bool = False,
                   chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(x_t | x_<t) for t = 1..T-1 under a causal LM, and (with_entropy) the entropy of each of those
    distributions: ids [B, T] -> ([B, T-1], [B, T-1] or None), fp32, never holding [B, T, vocab] logits.

    `model`: an HF causal LM, PEFT-wrapped or not, or a DeepSpeed engine around one, called as for its logits. The
    chunks run as the output layer's forward (`_as_forward`), so ZeRO-3 gathers that layer as it would for its
    logits. A LoRA output layer adds s·B A x to W x: the same product over [x, s·A x] and [W, B]."""
    net = _unwrap(model)
    for name in ("logit_scale", "logits_scaling"):  # families that scale logits in ways not written here
        if getattr(net.config, name, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"{type(net).__name__} scales its logits ({name}); not supported here")
    softcap = getattr(net.config, "final_logit_softcapping", None)
    hidden = last_hidden_state(model, input_ids, attention_mask, position_ids)[:, :-1]  # t predicts t+1
    head = net.get_output_embeddings()
    lora = getattr(head, "lora_A", None)
    adapters = [] if lora is None or head.disable_adapters or head.merged else [
        a for a in head.active_adapters if a in lora]
    if lora is not None and not adapters:
        head = head.get_base_layer()
    if not adapters:
        if not isinstance(head, torch.nn.Linear):
            raise TypeError(f"unsupported output layer {type(head).__name__}: expected a Linear or a LoRA Linear")
        return _as_forward(head, lambda h, y: chunked_logprobs(h, head.weight, y, head.bias, softcap, with_entropy,
                                                               chunk_size), hidden, input_ids[:, 1:])
    if any(head.use_dora.get(a, False) for a in adapters):
        raise NotImplementedError("DoRA on the output layer is not supported by the chunked log-probs")
    base, b_weights = head.get_base_layer(), [head.lora_B[a].weight for a in adapters]
    _zero3_external(head, base.weight, base.bias, *b_weights)
    hidden = torch.cat([hidden, *(head.scaling[a] * lora[a](head.lora_dropout[a](hidden)) for a in adapters)], -1)
    return _as_forward(head, lambda h, y: chunked_logprobs(h, torch.cat([base.weight, *b_weights], 1), y, base.bias,
                                                           softcap, with_entropy, chunk_size), hidden,
                       input_ids[:, 1:])
