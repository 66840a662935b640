"""The per-token loss: cross-entropy at the positions that carry a label, and their weights.

The model is asked for vocabulary logits only where the next token is in the
loss (a boolean `logits_to_keep`): most positions of a VLM batch are image
tokens or prompt, and full-vocabulary logits for them are the largest
activation of a step. The weighted token mean that `l2t.train` and
`l2t.pretrain` minimise is `(token_loss * weights).sum() / number of tokens in
the loss`; with both loss weights at 1 it is the usual mean over labelled tokens.
"""

from __future__ import annotations

import torch

from l2t.masking import IGNORE

MODEL_INPUTS_EXCLUDED = ("labels", "loss_weights", "loss_kinds")


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per-token cross-entropy of (N, V) logits, in fp32 a chunk of rows at a time (-100: loss 0)."""
    parts = [
        torch.nn.functional.cross_entropy(logits[i : i + chunk].float(), targets[i : i + chunk], ignore_index=IGNORE, reduction="none")
        for i in range(0, logits.shape[0], chunk)
    ]
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)


def labelled_token_loss(model, batch: dict, labelled_logits_only: bool = True) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(cross-entropy of every token in the loss, in batch order; where they are; the model's outputs).

    `batch` holds the model inputs plus `labels` (-100 outside the loss) and
    `loss_weights` (and `loss_kinds`); position t predicts token t + 1, so the
    mask (batch, length - 1) indexes `batch[key][:, 1:]`.
    """
    inputs = {k: v for k, v in batch.items() if k not in MODEL_INPUTS_EXCLUDED}
    targets = batch["labels"][:, 1:]
    in_loss = targets != IGNORE
    if labelled_logits_only:
        outputs = model(**inputs, logits_to_keep=torch.nn.functional.pad(in_loss, (0, 1), value=False))
        logits = outputs.logits
    else:
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1][in_loss]
    return token_cross_entropy(logits, targets[in_loss]), in_loss, outputs
