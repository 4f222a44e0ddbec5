"""What every DataModule of the library shares: the tokenizer, reading sources, a validation split, loaders."""

from __future__ import annotations

import random
from collections import Counter
from functools import cached_property

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lightning_align.data.formats import chat_template_check
from lightning_align.data.resume import EpochPermutation, ResumableLoader
from lightning_align.data.sources import DataError, DataSource, Row, held_out_rows, read_rows
from lightning_align.data.tokenize import IGNORE_INDEX, DroppedRow, adds_bos


def load_tokenizer(name_or_path: str, chat_template: str | None = None, what: str = "tokenizer"):
    """Load a tokenizer; a missing pad token falls back to EOS (padding is masked out everywhere). `what` names
    the setting the name came from in errors ("model" when a module loads its model's tokenizer)."""
    from transformers import AutoTokenizer

    from lightning_align.assets import hub_problem, resolve_model, why_not_loaded

    path = resolve_model(name_or_path)
    problem = hub_problem(str(path))
    if problem:
        raise DataError(f"{what} '{name_or_path}' could not be loaded: {problem}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise DataError(f"{what} '{name_or_path}' could not be loaded: {why_not_loaded(name_or_path, err)}") from None
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    # Rows longer than the model's maximum are cut by this library's truncation (with a count in the log), after
    # tokenising: the tokenizer's own warning about them would only come first and mislead.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise DataError(
                f"tokenizer '{name_or_path}' has neither a pad nor an EOS token; add one with "
                "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and save it, then resize the model's embeddings"
            )
        rank_zero_warn(f"tokenizer '{name_or_path}' has no pad token; using EOS ({tokenizer.eos_token!r}) for padding")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class AlignDataModule(L.LightningDataModule):
    """Reads `train_data` (and `val_data`, or a held-out share of train), encodes each row, batches them."""

    batch_kind: str | None = None

    def __init__(
        self,
        tokenizer: str,
        train_data: DataSource,
        val_data: DataSource | None = None,
        val_fraction: float = 0.0,
        batch_size: int = 8,
        max_length: int = 1024,
        chat_template: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        super().__init__()
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"batch_size must be at least 1 and max_length at least 2, got {batch_size}, {max_length}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.tokenizer_name = tokenizer
        self.tokenizer = load_tokenizer(tokenizer, chat_template)
        self.train_data, self.val_data = train_data, val_data
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.max_length = max_length
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.train_set: list[dict] | None = None
        self.val_set: list[dict] = []
        self.row_counts: Counter = Counter()  # what encoding did to the rows of the split being read

    @cached_property
    def tokenizer_adds_bos(self) -> bool:
        return adds_bos(self.tokenizer)

    def encode(self, row: Row) -> dict | None:
        """The example of one row; raises `DroppedRow` to leave it out (counted by reason in the log)."""
        raise NotImplementedError

    def collate(self, examples: list[dict]) -> dict:
        raise NotImplementedError

    def encode_rows(self, rows: list[Row]) -> list[dict]:
        """The rows' examples; one log line counts what was kept as is, truncated and dropped (and why)."""
        if any(isinstance(row.fields.get("messages"), list) for row in rows[:1]):
            chat_template_check(self.tokenizer, self.tokenizer_name)
        self.row_counts = Counter()
        dropped: Counter = Counter()
        kept = []
        for row in rows:
            try:
                kept.append(self.encode(row))
            except DroppedRow as why:
                dropped[str(why)] += 1
        if rows and (dropped or self.row_counts):
            notes = [f"{n} {what}" for what, n in self.row_counts.items() if what != "truncated" and n]
            rank_zero_info(
                f"{rows[0].source}: {len(rows)} rows: {len(kept)} kept ({self.row_counts['truncated']} truncated), "
                f"{sum(dropped.values())} dropped"
                + "".join(f"; {n} {why}" for why, n in dropped.items())
                + "".join(f"; {note}" for note in notes)
            )
        self.count_unknown_tokens(kept, rows[0].source if rows else "")
        for what, n in self.row_counts.items():
            if "whitespace" in what and n:
                rank_zero_warn(f"{rows[0].source}: {n} pairs whose chosen and rejected differ only in whitespace")
        if rows and not kept:
            raise DataError(f"{rows[0].source}: all {len(rows)} rows were dropped ({', '.join(dropped)})")
        return kept

    def count_unknown_tokens(self, examples: list, source: str) -> None:
        """Warn when the tokenizer could not represent the text: its unknown token in the scored tokens (prompt
        tokens for prompt-only data) above `UNKNOWN_SHARE`, with the count."""
        unk = self.tokenizer.unk_token_id
        if unk is None or not examples:
            return
        total = unknown = 0
        for tokens in token_lists(examples):
            scored = [t for t in tokens if t != IGNORE_INDEX]
            total += len(scored)
            unknown += scored.count(unk)
        if total and unknown / total > UNKNOWN_SHARE:
            rank_zero_warn(
                f"{source}: {unknown} of {total} scored tokens ({unknown / total:.1%}) are the tokenizer's unknown "
                f"token {self.tokenizer.unk_token!r}: '{self.tokenizer_name}' cannot represent that text (another "
                "script, emoji?); the model learns to write unknown tokens there. Use a tokenizer that covers it"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_rows = read_rows(self.train_data)
        if not train_rows:
            raise DataError(f"{self.train_data}: no rows")
        if self.val_data is not None:
            val_rows = read_rows(self.val_data)
            if not val_rows:
                raise DataError(f"{self.val_data}: no rows (val_data); give a file with rows, or leave val_data out")
        elif self.val_fraction > 0:
            order = list(range(len(train_rows)))
            random.Random(self.seed).shuffle(order)
            n_val = max(1, int(len(train_rows) * self.val_fraction))
            val_rows = [train_rows[i] for i in sorted(order[:n_val])]
            train_rows = [train_rows[i] for i in sorted(order[n_val:])]
        else:
            val_rows = []
            held_out = held_out_rows(self.train_data)
            if held_out is not None:
                split, val_rows = held_out
                rank_zero_info(f"{self.train_data}: validating on its '{split}' split ({len(val_rows)} rows)")
        self.train_set = self.encode_rows(train_rows)
        self.val_set = self.encode_rows(val_rows)

    def loader(self, examples: list[dict], shuffle: bool) -> DataLoader:
        return DataLoader(
            examples,
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochPermutation(
                len(self.train_set), self.seed, self.current_epoch, *self.rank_and_world(), shuffle=self.shuffle
            ),
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            skip=self.batches_to_skip,
        )

    # ----- exact resume: where in the epoch a checkpoint was taken -----------------------------------------------
    def rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def state_dict(self) -> dict:
        if self.trainer is None or not self.trainer.training:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state: dict) -> None:
        self.resume_from = state or None

    def batches_to_skip(self) -> int:
        """Batches of this epoch trained on before the checkpoint being resumed from (once, then 0)."""
        resume, self.resume_from = getattr(self, "resume_from", None), None
        if resume is None or resume["epoch"] != self.current_epoch():
            return 0
        return resume["batches_done"]

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_set and self.trainer is not None and self.trainer.state.fn == "validate":
            raise DataError(
                f"{type(self).__name__} has no validation data, so validate would measure nothing: give val_data "
                "(or val_fraction)"
            )
        return self.loader(self.val_set, shuffle=False) if self.val_set else []


# Above this share of unknown tokens in the scored text, a data set is warned about.
UNKNOWN_SHARE = 0.01


def token_lists(examples):
    """Each example's scored token lists (`labels`, or `input_ids` where it has none, as a prompt has)."""
    for example in examples:
        if isinstance(example, list):
            yield from token_lists(example)
        elif isinstance(example, dict):
            if "labels" in example or "input_ids" in example:
                yield example.get("labels", example.get("input_ids"))
            yield from token_lists([v for v in example.values() if isinstance(v, dict)])
