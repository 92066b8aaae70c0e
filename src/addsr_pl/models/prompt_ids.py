"""A prompt's token ids built on the device from a tag mask: no string, no host round trip.

CLIP's tokenizer cuts a text at whitespace before anything else (then into runs of letters, single
digits and runs of other characters) and runs BPE inside each piece, so a text cut just after a
whitespace tokenizes piece by piece. A tag prompt is "{tag}{sep}{tag}{sep}...{tag}{tail}", and each
tag with what follows it up to the next space is such a piece: "{tag}, " before another tag, "{tag}, "
or "{tag}" alone before the tail that `PromptEncoder.compose` writes after the tags (the rest of the
prompt, fixed per manual prompt). The ids of every (tag, follower) pair are tokenized once, with the
tag, so a tag ending in punctuation that merges with the separator's comma ("c++," is one piece)
keeps the ids the whole text has. The table checks this on the tokenizer it is built from (all tags
joined, in order) and refuses a tokenizer or separator for which it does not hold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

# What follows a tag, by index: another tag (the tag separator), the tail after the tags (the
# separator `compose` joins its parts with), nothing (the tags end the prompt).
FOLLOWS_TAG, FOLLOWS_TAIL, FOLLOWS_NOTHING = 0, 1, 2
# Stands for "the tags" in `compose`'s output, to find where the tail begins.
TAGS_MARK = "\x00"
PAD = -1  # a free slot in the frame's rows (not a token id)


class PromptIds(nn.Module):
    """[B, max_length] token ids of the prompts `compose` writes, from a tag mask [B, tags], with the
    tokenizer's layout: BOS, the text's ids truncated to max_length - 2, EOS, then the pad id.

    Args:
        tokenizer: the CLIP tokenizer of the text encoder (a Hugging Face tokenizer).
        compose: `(tags, manual) -> text`, the prompt of one image (`PromptEncoder.compose`).
        part_separator: what `compose` puts between the tags and the rest of the prompt.
        tags, tag_separator: the tagger's tag list and how its tags are joined; None for prompts
            without tags (then the ids are the frame's alone).

    A call takes the mask and the `frame` of the batch's manual prompts, built on the host once per
    batch of texts (`frame`): tensors only, no `.tolist()` or `.item()`, so it runs under
    `torch.compile` and inside a CUDA graph.
    """

    def __init__(
        self,
        tokenizer,
        compose: Callable[[str, str], str],
        part_separator: str,
        tags: Sequence[str] | None = None,
        tag_separator: str = ", ",
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.compose = compose
        self.part_separator = part_separator
        self.max_length = int(tokenizer.model_max_length)
        if self.max_length < 2 or self.max_length > 4096:
            raise ValueError(
                f"tokenizer model_max_length = {self.max_length}: prompt ids need the text encoder's length"
            )
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        if None in (self.bos, self.eos, self.pad):
            raise ValueError("prompt ids need a tokenizer with BOS, EOS and pad tokens (CLIP's)")
        self.has_tags = tags is not None
        if tags is not None:
            units, lengths = self._tag_units(list(tags), tag_separator)
            self.register_buffer("units", units, persistent=False)  # [followers, tags, longest]
            self.register_buffer("unit_lengths", lengths, persistent=False)  # [followers, tags]

    def _tokens(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False, verbose=False).input_ids  # no length warning

    def _tag_units(self, tags: list[str], tag_separator: str) -> tuple[Tensor, Tensor]:
        if not tags:
            raise ValueError("on-device prompt ids need a non-empty tag list")
        empty = [i for i, tag in enumerate(tags) if not tag]
        if empty:
            raise ValueError(
                f"tag {empty[0]} of the tag list is empty: an empty tag alone would leave no tags in the "
                "prompt; remove the empty lines from the tag list"
            )
        for name, follower in (
            ("tag_separator", tag_separator),
            ("compose's separator", self.part_separator),
        ):
            if not follower[-1:].isspace():
                raise ValueError(
                    f"{name} = {follower!r} does not end with a space: tags cannot be tokenized one by one "
                    "(the next part would merge with them); on-device prompt ids need e.g. ', '"
                )
        followers = (tag_separator, self.part_separator, "")
        ids = [self._tokens([tag + follower for tag in tags]) for follower in followers]
        whole = self._tokens([tag_separator.join(tags)])[0]
        pieces = [i for row in ids[FOLLOWS_TAG][:-1] for i in row] + ids[FOLLOWS_NOTHING][-1]
        if pieces != whole:
            at = next(n for n, (a, b) in enumerate(zip(pieces + [None], whole + [None])) if a != b)
            raise ValueError(
                f"this tokenizer does not split tag prompts at whitespace (the tags' own ids differ from "
                f"the joined tags' from token {at}): on-device prompt ids need a CLIP tokenizer"
            )
        longest = max(len(row) for follower in ids for row in follower)
        units = torch.full((len(followers), len(tags), max(longest, 1)), PAD, dtype=torch.long)
        lengths = torch.zeros(len(followers), len(tags), dtype=torch.long)
        for f, follower in enumerate(ids):
            for t, row in enumerate(follower):
                units[f, t, : len(row)] = torch.tensor(row, dtype=torch.long)
                lengths[f, t] = len(row)
        return units, lengths

    def frame(self, manual: Sequence[str], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """What the prompts of these manual texts are besides the tags, on the host, once per batch:
        `frame` [B, 2, max_length - 2] holds the ids of the tail after the tags (row 0) and of the
        prompt without tags (row 1), `PAD` after them; `joined` [B] says whether the tags are followed
        by `part_separator` (True) or end the prompt."""
        capacity = self.max_length - 2
        rows, joined = [], []
        for text in manual:
            tail, follows = "", False
            if self.has_tags:
                marked = self.compose(TAGS_MARK, text)
                if not marked.startswith(TAGS_MARK):
                    raise ValueError(f"compose() does not start with the tags: {marked!r}")
                tail = marked[len(TAGS_MARK) :]
                follows = bool(tail)
                if follows and not tail.startswith(self.part_separator):
                    raise ValueError(f"compose() puts {tail!r} after the tags, not {self.part_separator!r}")
                tail = tail[len(self.part_separator) :]
            rows.append([tail, self.compose("", text)])
            joined.append(follows)
        ids = self._tokens([text for row in rows for text in row])
        frame = torch.full((len(rows), 2, capacity), PAD, dtype=torch.long)
        for n, row in enumerate(ids):
            row = row[:capacity]
            frame[n // 2, n % 2, : len(row)] = torch.tensor(row, dtype=torch.long)
        return frame.to(device), torch.tensor(joined, device=device)

    def forward(self, mask: Tensor | None, frame: Tensor, joined: Tensor) -> Tensor:
        """[B, max_length] ids of the prompts with the tags of `mask` ([B, tags] bool, None: no tags),
        in tag-list order, and the texts of `frame` and `joined` (see `frame`)."""
        capacity = self.max_length - 2
        positions = torch.arange(capacity, device=frame.device)
        if mask is None:
            content = frame[:, 1]
            count = (content != PAD).sum(-1)
        else:
            tags = torch.arange(mask.shape[1], device=mask.device)
            # the last selected tag of each row takes what follows the tags, every other one the separator
            last = mask & (mask.flip(-1).cumsum(-1).flip(-1) == 1)
            tail = torch.where(joined, FOLLOWS_TAIL, FOLLOWS_NOTHING)[:, None]
            follower = torch.where(last, tail, FOLLOWS_TAG)  # [B, tags]
            lengths = torch.where(mask, self.unit_lengths[follower, tags], 0)
            ends = lengths.cumsum(-1)  # each tag's ids end here in the text
            total = ends[:, -1:]
            # which tag each of the first `capacity` positions falls in, and where inside that tag's ids
            index = torch.searchsorted(ends, positions.expand(mask.shape[0], -1).contiguous(), right=True)
            index = index.clamp(max=mask.shape[1] - 1)
            start = ends.gather(1, index) - lengths.gather(1, index)
            inside = (positions - start).clamp(0, self.units.shape[-1] - 1)
            tag_ids = self.units[follower.gather(1, index), index, inside]
            rest = torch.where(mask.any(-1, keepdim=True), frame[:, 0], frame[:, 1])
            rest_ids = rest.gather(1, (positions - total).clamp(0, capacity - 1))
            content = torch.where(positions < total, tag_ids, rest_ids)
            count = total.squeeze(1) + (rest != PAD).sum(-1)
        count = count.clamp(max=capacity)[:, None]
        # positions 1 .. max_length - 1: the text's ids, EOS after them, then padding
        body = torch.cat([content, content.new_full((content.shape[0], 1), self.pad)], dim=1)
        slots = torch.arange(1, self.max_length, device=frame.device)
        body = torch.where(slots <= count, body, torch.where(slots == count + 1, self.eos, self.pad))
        return torch.cat([body.new_full((body.shape[0], 1), self.bos), body], dim=1)
