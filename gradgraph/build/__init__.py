"""The graph builder. build_graph = record (one forward pass with every hook point recorded) + assemble (per-op
emitters that ask a ``RuleSet`` for each op's local derivative blocks).

Canonical decomposition into ops (the top path and the entropy depend on it). Per layer L of a
pre-norm model, following TransformerLens' own computation with ``use_split_qkv_input``:

1. ``hook_resid_pre`` → ``hook_{q,k,v}_input``: per-head copies (Broadcast; n_heads copies for q,
   n_key_value_heads for k and v).
2. ``ln1`` on each copy (firing suffix ``:q``/``:k``/``:v``), as TransformerLens computes it:
   LayerNorm first centres, x̃ = x − mean(x) (node ``ln1.centered``, the map I − 11ᵀ/d); RMSNorm
   uses x̃ = x. Then ``hook_scale`` s = sqrt(mean(x̃²) + ε) (edges x̃_i → s: x̃_i/(d s)), and
   ``hook_normalized`` y = x̃ / s (edges x̃_j → y_j: 1/s and s → y_j: −x̃_j/s²). A norm's Jacobian
   is thus diagonal plus rank one through the scale node. The norm's weight w is folded into the
   next linear map (W' = diag(w) W).
3. ``hook_q/k/v`` = y W_Q/W_K/W_V + b (shared linear maps per head / key-value head).
4. Rotary (Llama): ``hook_rot_q/k`` = q cos + rotate(q) sin: two diagonal parts per element.
5. ``hook_attn_scores`` = q·k / attn_scale: a bilinear product, one edge block from each operand
   (the other operand is the weight); causally masked scores are constants, not nodes.
6. ``hook_pattern`` = softmax(scores): per row the Jacobian diag(p) − p pᵀ, kept as its factors.
7. ``hook_z`` = pattern · v: bilinear, one block from the pattern and one from v (grouped-query
   attention: a key/value head feeds each query head of its group).
8. ``hook_attn_out`` = Σ_h z_h W_O[h] + b_O (one shared linear map over (head, d_head)).
9. ``hook_resid_mid`` = resid_pre + attn_out (a residual sum); ``hook_mlp_in`` = resid_mid (a copy).
10. ``ln2`` as in 2 (no suffix); ``mlp.hook_pre`` = y W_in (gate: y W_gate) + b;
    ``mlp.hook_pre_linear`` = y W_in + b (gated MLPs); ``mlp.hook_post`` = act(pre)
    (× pre_linear): diagonal edges act'(pre)·pre_linear from pre and act(pre) from pre_linear.
11. ``hook_mlp_out`` = post W_out + b_out; ``hook_resid_post`` = resid_mid + mlp_out; the next
    layer's ``hook_resid_pre`` = this ``hook_resid_post`` (a copy).

Inputs are ``hook_embed`` (and ``hook_pos_embed``), summed into ``blocks.0.hook_resid_pre``. After
the last layer: ``ln_final`` as in 2, ``unembed.hook_in`` = y ⊙ w + b (identity when the weight is
folded), the logits ``unembed.hook_out`` = x W_U + b_U (only the vocabulary columns the metric
depends on: no other logit lies on a path to it), and ``metric``: one op from the logits with
weights ∂metric/∂logits (by autograd).

What other families add, each one emitter: parallel blocks (Pythia, GPT-J, Phi: the MLP reads
``hook_mlp_in`` = resid_pre, and resid_post = resid_pre + attn_out + mlp_out) and attention-only
ones (resid_post = resid_pre + attn_out); no norm (the norm's nodes are absent); q/k norms (Qwen3
per head, OLMo-2 over all heads: ``Reshape`` to the rows TransformerLens normalises, the norm, its
weight as a diagonal, ``Reshape`` back to ``attn.q_normed``); norms after attention and the MLP
(Gemma 2's ``ln1_post``/``ln2_post``; OLMo-2's ``ln1``/``ln2``, which then have none before)
between ``attn.out`` / ``mlp.out`` and ``hook_attn_out`` / ``hook_mlp_out``; soft caps c·tanh(x/c)
as element-wise ops from ``attn.scores_raw`` and into ``unembed.soft_capped``; local layers mask
keys outside the window like causally masked ones; SoLU is a softmax over the MLP's width, a
product with its input (``mlp.hook_mid``) and a LayerNorm. Encoders: ``gradgraph.build.encoder``.

Under ``rules=GRADIENT`` every block is the true local Jacobian; other rule sets (``gradgraph.rules``)
change the norm, activation, softmax, linear, bilinear and residual blocks and nothing else.

Modules: ``record`` (the forward pass), ``emit`` (the op emitters every layout shares), ``decoder``
and ``encoder`` (the layouts), ``assemble`` (a layout's emitters under a rule set).
"""

from gradgraph.build.assemble import LAYOUTS, assemble, build_graph, check_head_mask
from gradgraph.build.record import Recording, after_prefix, record

__all__ = ["LAYOUTS", "Recording", "after_prefix", "assemble", "build_graph", "check_head_mask", "record"]
