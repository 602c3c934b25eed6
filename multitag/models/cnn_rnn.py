"""cnn_rnn: CNN-RNN (Wang et al., "CNN-RNN: A Unified Framework for Multi-label Image
Classification", CVPR 2016) — a CNN image embedding plus a label RNN that emits an image's labels
one at a time, then END.

Architecture (as in the paper: the image enters a projection layer shared with the RNN output,
and label scores are dot products with the label embeddings):

    I   = W_I · pool(CNN(x))                       image embedding             (B, E)
    e_t = U_l[y_{t-1}]                             label embedding, y_{-1}=START (B, E)
    o_t = LSTM(e_t, o_{t-1})                       (or GRU: rnn="gru")          (B, H)
    x_t = ReLU(W_o · o_t + I)                      projection of both           (B, E)
    s_t = x_t · U_l[:C+1]ᵀ + b                     scores over C labels + END   (B, C+1)

Labels already emitted are masked (-inf) before the softmax, so no label repeats. The RNN starts
from a zero state; the image reaches every step through the projection layer.

Training (``sequence_loss``) is teacher forcing: each image's positive labels are ordered by
training-set frequency (``label_order``: most frequent first, ties by class index; or
``order="rare_first"``), followed by END; masked cross-entropy over the sequence, padding masked.
Ignored (e.g. VOC "difficult") pairs are not part of the target sequence *and* are masked out of
that image's softmax at every step, so they are neither positives nor negatives, as with MaskedBCE.

Inference: beam search (``beam_size``, default 3) ranks finished sequences by length-normalised
log-probability (sum of log p over the labels and END, divided by their number); ``decode`` returns
the best sequence's label set, ``greedy=True`` the greedy one. Beam size 1 is exactly greedy.

Per-class score (what ``forward`` returns as logits, for mAP, PR curves, thresholds):

    m_c     = max over the final beams and their decoding steps t of p(c | image, prefix_t)
              (the highest probability the decoder gives c as the next label anywhere along the
              hypotheses the beam search kept; the step that emitted c counts)
    score_c = (m_c + [c ∈ decoded set]) / 2         logit_c = logit(clamp(score_c, 1e-6, 1 - 1e-6))

so the labels of the decoded (best) sequence score in [0.5, 1] and all others in [0, 0.5): the
threshold 0.5 reproduces the model's own decoded sets, every decoded label outranks every undecoded
one in an image (a tie only if an undecoded m_c is exactly 1), and m_c orders images within each
tier for ranking metrics (on the digit mosaics this ranked better than m_c alone: test mAP .695
vs .685 at beam 3). The score ranks; it is
not a calibrated marginal probability (thresholds calibrated on val adjust per class, as usual).

Other notes:
- ``forward = forward_head(forward_features(x))``; ``forward_features`` is the backbone's feature
  map (for Grad-CAM), ``forward_head`` pools it and runs the beam search. Gradients flow from
  the scores to the features through the chosen probabilities (beam choices are discrete).
- ``get_classifier()`` is the decoder (image projection, label embedding, RNN, projection), so a
  stage's ``freeze: [backbone]`` trains the decoder on a frozen CNN.
- The backbone is any registry model (``backbone``, ``backbone_args``); its input normalisation
  applies. The default efficientnet_lite0 wants mean = std = 0.5, which is this model's registry
  default; with another backbone set data.mean/std to what it expects (recipes set them explicitly).
- The beam search is data-dependent Python control flow: a trace would fix the number of
  decoding steps, so tracing / ONNX export raise (``multitag export`` reports that the model
  cannot be exported; use the torch backend). torch.compile is optional and untested here.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ORDERS = ("frequent_first", "rare_first")
PAD = -1               # padding in target and decoded sequences (ignored by the loss)
NEG_INF = float("-inf")

# A decoding step: (previous tokens (N,), state tuple of (N, ...) tensors) →
# (unnormalised scores over C labels + END (N, C+1), new state).
StepFn = Callable[[torch.Tensor, tuple], tuple[torch.Tensor, tuple]]


# --- label sequences ---------------------------------------------------------------------------

def label_order(label_counts: Sequence[int], order: str = "frequent_first") -> torch.Tensor:
    """Class indices in emission order: by training-set frequency, most frequent first (or
    ``rare_first``), ties broken by class index (ascending) so the order is deterministic."""
    if order not in ORDERS:
        raise ValueError(f'order must be one of {ORDERS}, got "{order}"')
    sign = -1 if order == "frequent_first" else 1
    ranked = sorted(range(len(label_counts)), key=lambda c: (sign * label_counts[c], c))
    return torch.tensor(ranked, dtype=torch.long)


def target_sequences(targets: torch.Tensor, ignore: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor:
    """(B, C) 0/1 targets → (B, L) int64 label sequences: positives in ``order``, then END (= C),
    then PAD; L = most positives in the batch + 1. Ignored pairs are left out."""
    B, C = targets.shape
    pos = targets > 0.5
    if ignore is not None:
        pos &= ~ignore.bool()
    order = order.to(targets.device)
    pos_in_order = pos[:, order]                                             # (B, C), column k = class order[k]
    rank = torch.arange(C, device=targets.device)
    # sorting puts the positives first, in emission order; negatives after them
    slots = torch.argsort(torch.where(pos_in_order, rank, rank + C), dim=1)  # (B, C)
    n = pos.sum(1, keepdim=True)                                             # (B, 1) labels per image
    L = int(n.max()) + 1 if B else 1
    seq = torch.cat([order[slots[:, :L - 1]], slots.new_full((B, 1), PAD)], 1)  # (B, L)
    step = torch.arange(L, device=targets.device)
    seq = torch.where(step < n, seq, torch.full_like(seq, PAD))
    return torch.where(step == n, torch.full_like(seq, C), seq)


def emitted_before(seq: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, L) sequences → (B, L, C+1) bool: label c was emitted before step t (END never is)."""
    is_label = (seq >= 0) & (seq < num_classes)
    onehot = F.one_hot(seq.clamp(min=0), num_classes + 1) * is_label[..., None]   # (B, L, C+1)
    return (onehot.cumsum(1) - onehot) > 0


# --- decoding ------------------------------------------------------------------------------------

@dataclass
class Decoded:
    sequences: torch.Tensor     # (B, max_len) int64: the best sequence's labels in emission order, PAD after
    max_prob: torch.Tensor      # (B, C) m_c: the best p(c | prefix) along the final beams (see module doc)

    def label_sets(self) -> list[list[int]]:
        return [[int(c) for c in row if c >= 0] for row in self.sequences.tolist()]

    def decoded_mask(self) -> torch.Tensor:
        """(B, C) bool: class c is in the decoded set."""
        seq = self.sequences
        onehot = F.one_hot(seq.clamp(min=0), self.max_prob.shape[1]) * (seq >= 0)[..., None]  # (B, max_len, C)
        return onehot.sum(1) > 0

    def class_scores(self) -> torch.Tensor:
        """(B, C) per-class scores in [0, 1]: (m_c + [c decoded]) / 2 (see module doc)."""
        return (self.max_prob + self.decoded_mask().to(self.max_prob.dtype)) / 2


def _next_log_probs(logits: torch.Tensor, emitted: torch.Tensor, t: int, max_len: int) -> torch.Tensor:
    """Scores (..., C+1) → log-probabilities with emitted labels masked; after max_len labels
    only END is left."""
    logits = logits.float().masked_fill(emitted, NEG_INF)
    if t == max_len:
        logits = torch.cat([torch.full_like(logits[..., :-1], NEG_INF), logits[..., -1:]], -1)
    return torch.log_softmax(logits, -1)


def greedy_search(step: StepFn, state: tuple, num_classes: int, max_len: int) -> Decoded:
    """Emit the most probable next token until END (or max_len labels). state: (B, ...) tensors."""
    C, B = num_classes, state[0].shape[0]
    device = state[0].device
    tokens = torch.full((B,), C + 1, dtype=torch.long, device=device)        # START
    emitted = torch.zeros(B, C + 1, dtype=torch.bool, device=device)
    max_prob = torch.zeros(B, C, device=device)
    seq = torch.full((B, max_len), PAD, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_len + 1):
        logits, state = step(tokens, state)
        logp = _next_log_probs(logits, emitted, t, max_len)                     # (B, C+1)
        max_prob = torch.where(finished[:, None], max_prob, torch.maximum(max_prob, logp[:, :C].exp()))
        tokens = torch.where(finished, C, logp.argmax(-1))
        finished = finished | (tokens == C)
        if finished.all():
            break
        seq[:, t] = torch.where(finished, PAD, tokens)
        emitted = emitted | _label_onehot(tokens, C)
    return Decoded(seq, max_prob)


def beam_search(step: StepFn, state: tuple, num_classes: int, max_len: int, beam_size: int = 3) -> Decoded:
    """Length-normalised beam search over label sequences. state: (B, ...) tensors, one per image.

    Each step ranks the beam_size × (C+1) extensions by total log-probability and keeps the best
    2 × beam_size (as fairseq does): an END among the first beam_size of them finishes that
    hypothesis (scored by total / number of tokens); the best beam_size others stay alive. An image
    is done when beam_size hypotheses have finished. Beam size 1 is therefore greedy decoding.
    """
    C, K, B = num_classes, beam_size, state[0].shape[0]
    device = state[0].device
    ar_k = torch.arange(2 * K, device=device)
    state = tuple(s.repeat_interleave(K, 0) for s in state)                  # (B*K, ...)
    tokens = torch.full((B * K,), C + 1, dtype=torch.long, device=device)     # START
    alive = torch.full((B, K), NEG_INF, device=device)                        # total log p of each live beam
    alive[:, 0] = 0                                                           # one start hypothesis, not K copies
    emitted = torch.zeros(B, K, C + 1, dtype=torch.bool, device=device)
    max_prob = torch.zeros(B, K, C, device=device)
    seq = torch.full((B, K, max_len), PAD, dtype=torch.long, device=device)
    done_score = torch.full((B, K), NEG_INF, device=device)                   # finished hypotheses
    done_seq, done_prob = seq.clone(), max_prob.clone()
    n_done = torch.zeros(B, dtype=torch.long, device=device)

    for t in range(max_len + 1):
        logits, state = step(tokens, state)
        logp = _next_log_probs(logits.reshape(B, K, C + 1), emitted, t, max_len)         # (B, K, C+1)
        max_prob = torch.maximum(max_prob, logp[..., :C].exp())
        total, idx = (alive[..., None] + logp).view(B, K * (C + 1)).topk(2 * K, dim=1)  # (B, 2K) best first
        parent, token = idx // (C + 1), idx % (C + 1)
        is_end = token == C

        # finish: END within the first K ranks, of a real hypothesis, for images not yet done
        finish = is_end & (ar_k < K) & torch.isfinite(total) & (n_done < K)[:, None]
        normed = torch.where(finish, total / (t + 1), torch.full_like(total, NEG_INF))  # t labels + END
        done_score, pick = torch.cat([done_score, normed], 1).topk(K, dim=1)
        done_seq = _gather(torch.cat([done_seq, _gather(seq, parent)], 1), pick)
        done_prob = _gather(torch.cat([done_prob, _gather(max_prob, parent)], 1), pick)
        n_done = n_done + finish.sum(1)

        # stay alive: the first K non-END extensions (END ones sort last)
        keep = (ar_k + is_end * 2 * K).topk(K, dim=1, largest=False).indices              # (B, K)
        parent, token = parent.gather(1, keep), token.gather(1, keep)
        alive = torch.where(token == C, NEG_INF, total.gather(1, keep))
        if bool(((n_done >= K) | ~torch.isfinite(alive).any(1)).all()):
            break
        seq, emitted, max_prob = _gather(seq, parent), _gather(emitted, parent), _gather(max_prob, parent)
        seq[:, :, t] = token
        emitted = emitted | _label_onehot(token, C)
        rows = (torch.arange(B, device=device)[:, None] * K + parent).view(-1)        # (B*K,) into the old beams
        state = tuple(s[rows] for s in state)
        tokens = token.view(-1)
    return Decoded(done_seq[:, 0], _best_prob(done_prob, done_score))


def _label_onehot(tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
    """tokens (...) → (..., C+1) bool marking emitted labels; END stays unmarked so that a step
    always has a finite option (all -inf would give NaN log-probabilities)."""
    return F.one_hot(tokens, num_classes + 1).bool() & (tokens < num_classes)[..., None]


def _gather(x: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """Per image, the rows ``parent`` (B, N) of x (B, K, ...) → (B, N, ...)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], parent]


def _best_prob(prob: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """m_c: max over the finished hypotheses (B, K, C) that exist (score > -inf) → (B, C)."""
    return prob.masked_fill(~torch.isfinite(score)[..., None], 0).amax(1)


# --- the model -----------------------------------------------------------------------------------

class LabelDecoder(nn.Module):
    """Image projection, label embedding, RNN and projection layer: everything but the CNN."""

    def __init__(self, num_classes: int, num_features: int, embed_dim: int, hidden: int, rnn: str, drop_rate: float):
        super().__init__()
        if rnn not in ("lstm", "gru"):
            raise ValueError(f'rnn must be "lstm" or "gru", got "{rnn}"')
        self.num_classes = num_classes
        self.image_proj = nn.Linear(num_features, embed_dim)        # W_I
        self.label_embed = nn.Embedding(num_classes + 2, embed_dim)  # U_l: C labels, END (= C), START (= C+1)
        self.rnn = (nn.LSTM if rnn == "lstm" else nn.GRU)(embed_dim, hidden, batch_first=True)
        self.rnn_proj = nn.Linear(hidden, embed_dim)                 # W_o
        self.out_bias = nn.Parameter(torch.zeros(num_classes + 1))
        self.drop = nn.Dropout(drop_rate)
        # nn.Embedding's N(0, 1) would make the tied output scores ~sqrt(E) times too large at the start
        nn.init.normal_(self.label_embed.weight, std=embed_dim ** -0.5)

    def scores(self, o: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """RNN outputs (..., H) and image embeddings (..., E) → scores over C labels + END (..., C+1)."""
        x = torch.relu(self.rnn_proj(o) + image)                             # (..., E)
        return self.drop(x) @ self.label_embed.weight[:self.num_classes + 1].T + self.out_bias

    def teacher_forced(self, image: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """image (B, E), previous tokens (B, L) → scores (B, L, C+1) at every step."""
        o, _ = self.rnn(self.label_embed(inputs))                            # (B, L, H)
        return self.scores(o, image[:, None])

    def initial_state(self, image: torch.Tensor) -> tuple:
        """Decoding state per image: (image embedding (B, E), h (B, H)[, c (B, H)]), zero RNN state."""
        zeros = image.new_zeros(image.shape[0], self.rnn.hidden_size)
        return (image, zeros, zeros) if isinstance(self.rnn, nn.LSTM) else (image, zeros)

    def step(self, tokens: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        """One decoding step (a StepFn): previous tokens (N,) → scores (N, C+1), next state."""
        image, *rnn_state = state
        rnn_state = tuple(s[None].contiguous() for s in rnn_state)          # (1, N, H): nn.LSTM/GRU layout
        o, new = self.rnn(self.label_embed(tokens)[:, None], rnn_state if len(rnn_state) == 2 else rnn_state[0])
        new = new if isinstance(new, tuple) else (new,)
        return self.scores(o[:, 0], image), (image, *(s[0] for s in new))


class CNNRNN(nn.Module):
    """CNN-RNN multi-label classifier; see the module docstring for the score definition."""

    def __init__(self, num_classes: int, label_counts: Sequence[int] | None = None, order: str = "frequent_first",
                 backbone: str = "efficientnet_lite0", backbone_args: dict | None = None, pretrained: bool = True,
                 embed_dim: int = 256, hidden: int = 512, rnn: str = "lstm", drop_rate: float = 0.0,
                 beam_size: int = 3, max_len: int | None = None):
        super().__init__()
        # imported here: the registry imports this module's builder lazily too (no import cycle)
        from multitag.models.registry import build_model, get_spec

        if label_counts is not None and len(label_counts) != num_classes:
            raise ValueError(f"label_counts has {len(label_counts)} entries for {num_classes} classes")
        self.num_classes, self.beam_size = num_classes, beam_size
        self.max_len = max_len or num_classes                  # most labels one image can get
        # the emission order used for training targets; rebuilt from model.json's label_counts on load
        self.register_buffer("order", label_order(label_counts or [0] * num_classes, order), persistent=False)
        # The decoder replaces the backbone's classifier. Builders with packaged weights are timm models,
        # which take 0 classes for "no head" (so the weight load says so); others get a placeholder head.
        spec = get_spec(backbone)
        self.backbone = build_model(backbone, 0 if spec.pretrained else 1, pretrained=pretrained,
                                    **(backbone_args or {}))
        if hasattr(self.backbone, "reset_classifier"):        # timm: drop the unused placeholder head
            self.backbone.reset_classifier(0)
        num_features = self._pooled_size(spec.default_size)
        self.decoder = LabelDecoder(num_classes, num_features, embed_dim, hidden, rnn, drop_rate)

    def _pooled_size(self, size: int) -> int:
        """Width of the backbone's pooled embedding, probed at its default input size (attribute
        names differ: timm's num_features is the pre-pool width for some families, simple_cnn's too)."""
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            width = self.embed(torch.zeros(1, 3, size, size)).shape[1]
        self.backbone.train(was_training)
        return width

    def get_classifier(self) -> nn.Module:
        """The 'head' for freezing and discriminative LRs: the whole label decoder."""
        return self.decoder

    # -- image side
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)                            # (B, K, h, w)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(features, pre_logits=True)        # (B, F)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))

    # -- training
    def sequence_loss(self, x: torch.Tensor, targets: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced masked cross-entropy over label sequences (labels in order, then END)."""
        C = self.num_classes
        seq = target_sequences(targets, ignore, self.order)                 # (B, L)
        start = seq.new_full((len(seq), 1), C + 1)
        inputs = torch.cat([start, seq[:, :-1].clamp(min=0)], 1)            # (B, L); PAD inputs only feed masked steps
        image = self.decoder.image_proj(self.embed(x))                      # (B, E)
        logits = self.decoder.teacher_forced(image, inputs)                 # (B, L, C+1)
        mask = emitted_before(seq, C)                                        # no repeats, as in decoding
        if ignore is not None:                                               # ignored pairs: neither + nor -
            end = ignore.new_zeros(len(ignore), 1, dtype=torch.bool)
            mask = mask | torch.cat([ignore.bool(), end], 1)[:, None]
        logits = logits.float().masked_fill(mask, NEG_INF)
        return F.cross_entropy(logits.flatten(0, 1), seq.flatten(), ignore_index=PAD)

    # -- inference
    def search(self, features: torch.Tensor, beam_size: int | None = None, greedy: bool = False) -> Decoded:
        """Backbone feature map (B, K, h, w) → decoded sequences and per-class max probabilities."""
        image = self.decoder.image_proj(self.pool(features))                 # (B, E)
        state = self.decoder.initial_state(image)
        beam = beam_size or self.beam_size
        if greedy:
            return greedy_search(self.decoder.step, state, self.num_classes, self.max_len)
        return beam_search(self.decoder.step, state, self.num_classes, self.max_len, beam)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Feature map → per-class logits (B, C) of the beam-search scores (module docstring)."""
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            # a trace would bake in the number of decoding steps of the example: wrong on other images
            raise RuntimeError("CNN-RNN's beam search is data-dependent Python control flow and cannot be "
                               "traced or exported to ONNX")
        score = self.search(features).class_scores()
        # The clamp keeps logit finite; its gradient passes straight through, or Grad-CAM of the most
        # confident labels (score past 1 - 1e-6) was all zero.
        return torch.logit(score + (score.clamp(1e-6, 1 - 1e-6) - score).detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def decode(self, x: torch.Tensor, beam_size: int | None = None, greedy: bool = False) -> list[list[int]]:
        """Images → the model's own label sets (class indices in emission order). Call in eval mode."""
        return self.search(self.forward_features(x), beam_size, greedy).label_sets()
