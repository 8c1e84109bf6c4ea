"""Instruction data: the book's chapter 7 recipe (Alpaca prompts, per-batch padding), without PyTorch.

The pipeline of chapter 7 of "Build a Large Language Model (From Scratch)" (Raschka:
ch07 `download_and_load_file`, `format_input`, the 85/10/5 split, `InstructionDataset`,
`custom_collate_fn`, the `DataLoader`s, the answer extraction and
`instruction-data-with-response.json`), and of its exercise 7.2 (`mask_instructions`):

1. download instruction-data.json from the book's repository into
   $MINILORA_HOME/instructions/ (atomic, sha256-checked; a good file there is used as is),
   or read your own JSON list / JSONL file of {instruction, input, output} objects;
2. split in file order: int(n*0.85) train, int(n*0.1) test, the rest validation
   (1,100 entries -> 935 / 110 / 55);
3. format each entry with the Alpaca prompt (`format_input`) and append
   "\\n\\n### Response:\\n" + output (`format_training_text`); encode with GPT-2 BPE
   (40 to 91 tokens on the book's data, mean 56.4);
4. per batch (`collate_instructions`): append one <|endoftext|> (50256) to each text,
   pad with 50256 to the batch's longest + 1, inputs = padded[:-1], targets =
   padded[1:], every 50256 target after a row's first -> -100 (ignored by the loss),
   optionally the prompt's targets -> -100 too, truncate to allowed_max_length (1024);
5. batches of 8 (`make_instruction_loaders`): training shuffled with drop_last
   (116 batches), validation and test in file order (7 and 14 batches).

A batch is two NumPy int64 arrays of the same shape (B, T): inputs (token ids) and
targets (the next token of each position, or -100 where the loss must not look).

Texts longer than allowed_max_length are truncated, as the book's collate truncates
them, and counted (`InstructionSplit.count_longer_than`) so that a caller can report
it; a text left with no target at all is refused (`check_targets`).

Data: instruction-data.json, from the book's repository rasbt/LLMs-from-scratch
(Apache License 2.0, Sebastian Raschka).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import cache_dir, is_offline
from .data import BatchLoader, DataError
from .download import DownloadError, download
from .files import write_text
from .tokenizer import END_OF_TEXT_ID, encode_texts, get_tokenizer

INSTRUCTION_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
                        "01_main-chapter-code/instruction-data.json")
INSTRUCTION_DATA_FILE = "instruction-data.json"
INSTRUCTION_DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
INSTRUCTION_DATA_BYTES = 203_524
RESPONSES_FILE = "instruction-data-with-response.json"  # the book's name for the answers file

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
RESPONSE_HEADER = "\n\n### Response:\n"
IGNORE_INDEX = -100  # the target id a cross-entropy skips (PyTorch's default ignore_index)
DEFAULT_ALLOWED_MAX_LENGTH = 1024  # GPT-2's context, the book's allowed_max_length
ENTRY_KEYS = ("instruction", "input", "output")


# ----------------------------------------------------------------------------- the book's file


def download_instruction_data(url=INSTRUCTION_DATA_URL, *, folder=None, sha256=INSTRUCTION_DATA_SHA256,
                              offline=None, progress=None):
    """Return the path of instruction-data.json, downloading it if needed.

    folder:   where it lives (default $MINILORA_HOME/instructions); a file there whose
              sha256 matches is used without any network access.
    url:      where to download it from (the book's repository; tests serve it locally).
    sha256:   the digest the file must have (the book's file by default; None: unchecked).
    offline:  never download (default: $MINILORA_OFFLINE).
    progress: progress bar for the download (None: only on a terminal).
    Raises DataError naming the exact path to put the file at.
    """
    folder = Path(folder) if folder is not None else cache_dir("instructions")
    path = folder / INSTRUCTION_DATA_FILE
    offline = is_offline() if offline is None else offline
    expected_size = INSTRUCTION_DATA_BYTES if sha256 == INSTRUCTION_DATA_SHA256 else None
    try:
        return download(url, path, expected_size=expected_size, sha256=sha256, offline=offline,
                        progress=progress)
    except DownloadError as exc:
        raise DataError(f"the instruction data is not in {folder} and cannot be downloaded: "
                        f"{exc} Alternatively put {INSTRUCTION_DATA_FILE} at {path}.") from exc


# ----------------------------------------------------------------------------- reading a file


def read_instruction_file(path):
    """Read a JSON list (or JSONL, one object per line) of {instruction, input, output} entries.

    `input` may be missing, null or empty (no input); other keys are ignored. Returns a list
    of dicts with exactly the three keys, all strings. Entries are counted from 0 (the index
    in the JSON list, or the line's entry in a JSONL file, whose line number is named too).
    Raises DataError, one line naming the file, the entry and the problem: not a list, an
    entry not an object, a missing or non-string key, an empty instruction or output, an
    empty file, a line that is not JSON.
    """
    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path} is empty: expected a JSON list of {{instruction, input, output}} "
                        f"objects")
    raw, line_numbers = _parse_json_or_jsonl(path, text)
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of {{instruction, input, output}} objects "
                        f"(or JSONL, one object per line), found a JSON {_json_type(raw)}")
    if not raw:
        raise DataError(f"{path} holds an empty list: no entries")
    entries = []
    for index, item in enumerate(raw):
        where = f"{path}: entry {index}" + (f" (line {line_numbers[index]})" if line_numbers else "")
        entries.append(_check_entry(item, where))
    return entries


def _read_text(path):
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc})") from exc


def _parse_json_or_jsonl(path, text):
    """(parsed value, None) for a JSON document, (list of objects, their line numbers) for JSONL.

    A file is JSONL when its name ends in .jsonl, or when it is not one JSON document but
    each of its non-blank lines is one (a .json file written line by line).
    """
    if path.suffix.lower() != ".jsonl":
        try:
            return json.loads(text), None
        except json.JSONDecodeError as exc:
            whole_file_error = exc
    else:
        whole_file_error = None
    values, line_numbers = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if whole_file_error is not None:  # neither JSON nor JSONL: the JSON error says where
                raise DataError(f"{path} is not valid JSON: {whole_file_error}") from whole_file_error
            raise DataError(f"{path}: line {number} is not valid JSON: {exc}") from exc
        line_numbers.append(number)
    return values, line_numbers


def _json_type(value):
    """What JSON calls the type of a parsed value (object, array, number, ...)."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _check_entry(item, where):
    """One entry as {instruction, input, output} strings, or a DataError naming `where`."""
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object {{instruction, input, output}}, "
                        f"found a JSON {_json_type(item)}")
    entry = {}
    for key in ENTRY_KEYS:
        value = item.get(key)
        if key == "input" and value is None:  # missing or null: no input, as "" in the book's file
            value = ""
        if key not in item and key != "input":
            raise DataError(f"{where}: missing key {key!r} (an entry needs 'instruction' and "
                            f"'output', and may have 'input')")
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, found a JSON {_json_type(value)}")
        if key != "input" and not value.strip():
            raise DataError(f"{where}: empty {key}")
        entry[key] = value
    return entry


# ----------------------------------------------------------------------------- split and prompt


def split_entries(entries, train_frac=0.85, test_frac=0.1):
    """The book's split, in file order: (train, val, test) lists.

    train = first int(n*train_frac), test = the next int(n*test_frac), validation = the
    rest (the book's order in the file is train, test, validation); 1,100 -> 935/110/55.
    """
    train_end = int(len(entries) * train_frac)
    test_end = train_end + int(len(entries) * test_frac)
    return entries[:train_end], entries[test_end:], entries[train_end:test_end]


def format_input(entry):
    """The Alpaca prompt of an entry (the book's `format_input`): what generation starts from.

    preamble + "\\n\\n### Instruction:\\n" + instruction, then "\\n\\n### Input:\\n" + input
    only when the input is non-empty.
    """
    prompt = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    if entry["input"]:
        prompt += f"\n\n### Input:\n{entry['input']}"
    return prompt


def format_training_text(entry):
    """The text trained on: the prompt, "\\n\\n### Response:\\n" and the output."""
    return format_input(entry) + RESPONSE_HEADER + entry["output"]


def format_answer(generated_text, prompt):
    """The model's answer: the generated text after the prompt, "### Response:" removed, stripped.

    The book's `generated_text[len(input_text):].replace("### Response:", "").strip()`:
    generated_text must begin with the prompt (a decoded prompt + continuation).
    """
    return generated_text[len(prompt):].replace("### Response:", "").strip()


def write_responses(path, entries, responses):
    """Write the book's instruction-data-with-response.json: each entry plus "model_response".

    As the book writes it (json.dump with indent=4), atomically (minilora.files).
    Returns the path.
    """
    if len(entries) != len(responses):
        raise ValueError(f"{len(entries)} entries but {len(responses)} responses")
    answered = [{**entry, "model_response": response} for entry, response in zip(entries, responses)]
    return write_text(path, json.dumps(answered, indent=4))


# ----------------------------------------------------------------------------- tokenized splits


@dataclass
class InstructionSplit:
    """One split, tokenized: what the book's InstructionDataset holds (exercise 7.2's version).

    Padding and targets are made per batch (`collate_instructions`).
    """

    name: str                  # "train", "val" or "test"
    entries: list              # N dicts {instruction, input, output}
    token_ids: list            # N lists: format_training_text(entry) encoded, not truncated
    prompt_lengths: np.ndarray  # (N,) int64: leading tokens of token_ids that are the prompt
    file_indices: np.ndarray   # (N,) int64: each entry's index in the file (for messages)
    source: str = ""           # the file the entries came from

    def __len__(self):
        return len(self.entries)

    @property
    def lengths(self):
        """(N,) int64: tokens per text (prompt + response, without the <|endoftext|>)."""
        return np.array([len(ids) for ids in self.token_ids], dtype=np.int64)

    def count_longer_than(self, allowed_max_length):
        """How many texts collate truncates at `allowed_max_length` (their end is lost)."""
        return int((self.lengths > allowed_max_length).sum())


@dataclass
class InstructionData:
    """Train / validation / test splits of one instruction file."""

    train: InstructionSplit
    val: InstructionSplit
    test: InstructionSplit
    source: str                # the file the entries came from

    @property
    def splits(self):
        return (self.train, self.val, self.test)

    def count_longer_than(self, allowed_max_length):
        """{split name: texts truncated at allowed_max_length}."""
        return {s.name: s.count_longer_than(allowed_max_length) for s in self.splits}


def prompt_token_count(tokenizer, token_ids, prompt):
    """How many leading tokens of `token_ids` (a text that starts with `prompt`) lie wholly
    inside the prompt.

    The book's exercise 7.2 counts len(tokenizer.encode(prompt)), the same number whenever
    the prompt's tokens are a prefix of the text's (all 1,100 entries of the book's file).
    A prompt ending in whitespace can share a token with "\\n\\n### Response:" ("hi.\\n" +
    "\\n\\n" encodes as "\\n\\n", "\\n", not "\\n", "\\n\\n"); such a token is counted as
    the response's, so masking never hides a target of the response.
    """
    ends = np.cumsum([len(tokenizer.decode_single_token_bytes(t)) for t in token_ids])  # (T,) bytes
    return int(np.searchsorted(ends, len(prompt.encode("utf-8")), side="right"))


def encode_entries(name, entries, tokenizer, *, first_index=0, source=""):
    """Tokenize entries like the book's InstructionDataset -> InstructionSplit.

    encode_texts (tiktoken's encode_ordinary) gives the book's encode() ids on all of its
    entries, and treats a literal "<|endoftext|>" in a user's text as text instead of raising.
    """
    texts = [format_training_text(entry) for entry in entries]
    token_ids = encode_texts(tokenizer, texts)
    prompt_lengths = [prompt_token_count(tokenizer, ids, format_input(entry))
                      for ids, entry in zip(token_ids, entries)]
    return InstructionSplit(name=name, entries=list(entries), token_ids=token_ids,
                            prompt_lengths=np.array(prompt_lengths, dtype=np.int64),
                            file_indices=np.arange(first_index, first_index + len(entries)),
                            source=str(source))


def make_instruction_splits(entries, tokenizer, *, source="", train_frac=0.85, test_frac=0.1):
    """Split entries the book's way (`split_entries`) and tokenize each part -> InstructionData."""
    train, val, test = split_entries(entries, train_frac, test_frac)
    for split_name, part in (("train", train), ("val", val), ("test", test)):
        if not part:
            raise DataError(f"{source or 'the data'}: {len(entries)} entries leave the {split_name} "
                            f"split empty; at least 10 entries are needed")
    # file order is train, test, validation
    return InstructionData(
        train=encode_entries("train", train, tokenizer, first_index=0, source=source),
        test=encode_entries("test", test, tokenizer, first_index=len(train), source=source),
        val=encode_entries("val", val, tokenizer, first_index=len(train) + len(test), source=source),
        source=str(source))


def load_instructions(path=None, *, tokenizer=None, url=INSTRUCTION_DATA_URL, folder=None,
                      offline=None, progress=None):
    """The chapter 7 data -> InstructionData: your own file at `path`, or (None) the book's.

    The book's file is downloaded (or reused) as `download_instruction_data` does; the
    tokenizer defaults to `get_tokenizer()`. With the book's file: 935 / 110 / 55 entries.
    """
    if path is None:
        path = download_instruction_data(url, folder=folder, offline=offline, progress=progress)
    entries = read_instruction_file(path)
    if tokenizer is None:
        tokenizer = get_tokenizer(offline=offline, progress=progress)
    return make_instruction_splits(entries, tokenizer, source=path)


# ----------------------------------------------------------------------------- batches


def collate_instructions(batch_token_ids, prompt_lengths=None, *, pad_token_id=END_OF_TEXT_ID,
                         ignore_index=IGNORE_INDEX, allowed_max_length=DEFAULT_ALLOWED_MAX_LENGTH):
    """The book's `custom_collate_fn` (and, with prompt_lengths, exercise 7.2's) in NumPy.

    batch_token_ids:    B lists of token ids (the encoded training texts).
    prompt_lengths:     None, or B ints P_b: text b's first P_b tokens are its prompt.
    allowed_max_length: truncate inputs and targets to this many positions (None: never).

    With n_b = len(text b) and T = max_b n_b + 1 (the longest text plus its <|endoftext|>):
      padded_b = text_b + [pad] * (T - n_b)     # one <|endoftext|>, then padding, all 50256
      inputs_b = padded_b[:-1]; targets_b = padded_b[1:]    # (T - 1,): the next token
      every pad_token_id in targets_b after its first -> ignore_index (only the first one,
        which teaches the model to stop, is a target)
      with prompt_lengths: targets_b[:P_b - 1] -> ignore_index. targets_b[j] is token j+1,
        so these are the targets that predict the prompt's tokens 1..P_b-1 (token 0 is never
        a target); "\\n\\n### Response:\\n" is still learned, since generation starts from the
        prompt alone and the model must write the header itself (`format_answer` drops it)
      truncate both to allowed_max_length.
    The order (mask, then truncate) and the first-pad rule are the book's, also for a text
    that itself holds a 50256 (its first 50256 target is the one kept).
    Returns (inputs, targets), int64 (B, min(T - 1, allowed_max_length)).
    """
    if len(batch_token_ids) == 0:
        raise ValueError("an empty batch")
    batch_max_length = max(len(ids) + 1 for ids in batch_token_ids)  # T
    inputs_rows, targets_rows = [], []
    for b, ids in enumerate(batch_token_ids):
        new_item = list(ids) + [pad_token_id]
        padded = np.array(new_item + [pad_token_id] * (batch_max_length - len(new_item)),
                          dtype=np.int64)  # (T,)
        inputs, targets = padded[:-1], padded[1:].copy()  # (T-1,) each
        pad_positions = np.flatnonzero(targets == pad_token_id)
        targets[pad_positions[1:]] = ignore_index
        if prompt_lengths is not None:
            # max(0, .): the book's targets[:P-1] would mask all but the last for P = 0
            targets[:max(int(prompt_lengths[b]) - 1, 0)] = ignore_index
        if allowed_max_length is not None:
            inputs, targets = inputs[:allowed_max_length], targets[:allowed_max_length]
        inputs_rows.append(inputs)
        targets_rows.append(targets)
    return np.stack(inputs_rows), np.stack(targets_rows)  # (B, T') each


def check_targets(split, *, allowed_max_length=DEFAULT_ALLOWED_MAX_LENGTH, mask_instructions=False):
    """Raise DataError, naming the file and the entry, if a text of `split` would have no target.

    Text b's targets are positions 0..n_b-1 (n_b tokens predict the next n_b - 1 and the
    <|endoftext|>); masking hides 0..P_b-2 and truncation keeps 0..A-1, so a target is left
    when min(n_b, A) > P_b - 1 (masking) or A >= 1 (no masking; n_b >= 1 always).
    """
    if allowed_max_length is not None and allowed_max_length < 1:
        raise ValueError(f"allowed_max_length must be at least 1, got {allowed_max_length}")
    if not mask_instructions:
        return
    kept = split.lengths if allowed_max_length is None else np.minimum(split.lengths, allowed_max_length)
    empty = np.flatnonzero(kept <= split.prompt_lengths - 1)  # (N,) -> indices of target-less texts
    if empty.size:
        b = int(empty[0])
        raise DataError(f"{split.source or 'the data'}: entry {int(split.file_indices[b])}: its prompt "
                        f"is {int(split.prompt_lengths[b])} tokens, so with mask_instructions and "
                        f"allowed_max_length {allowed_max_length} no target is left "
                        f"({empty.size} such entries in the {split.name} split); shorten them or "
                        f"raise allowed_max_length")


class InstructionLoader(BatchLoader):
    """Batches of (inputs, targets) from an InstructionSplit: the book's DataLoader + collate.

    The batch order is data.BatchLoader's (seeded by (seed, epoch), `set_epoch`,
    `epoch_batches(epoch, start)` to resume; batching "shuffled" or "by_length"); only
    the collate differs. Checks at construction that every text keeps a target.
    Yields (inputs (B, T), targets (B, T)), int64 NumPy arrays, T <= allowed_max_length.
    """

    def __init__(self, split, batch_size=8, *, shuffle=False, drop_last=False, seed=123,
                 batching="shuffled", allowed_max_length=DEFAULT_ALLOWED_MAX_LENGTH,
                 mask_instructions=False):
        check_targets(split, allowed_max_length=allowed_max_length, mask_instructions=mask_instructions)
        # pad_to="longest_in_batch": the book pads per batch, and batch_lengths then says so
        super().__init__(split, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                         pad_to="longest_in_batch", batching=batching)
        self.allowed_max_length = allowed_max_length
        self.mask_instructions = mask_instructions

    def batch_lengths(self, epoch):
        """(len(self),) int64: the length T of each batch of epoch `epoch`, after truncation."""
        lengths = super().batch_lengths(epoch)
        if self.allowed_max_length is None:
            return lengths
        return np.minimum(lengths, self.allowed_max_length)

    def epoch_batches(self, epoch, start=0):
        """The (inputs, targets) batches of epoch `epoch` from batch number `start` on."""
        order = self.order(epoch)
        for b in range(start, len(self)):
            rows = order[b * self.batch_size:(b + 1) * self.batch_size]
            prompt_lengths = self.split.prompt_lengths[rows] if self.mask_instructions else None
            yield collate_instructions([self.split.token_ids[i] for i in rows], prompt_lengths,
                                       allowed_max_length=self.allowed_max_length)


def make_instruction_loaders(data, batch_size=8, *, seed=123, batching="shuffled",
                             allowed_max_length=DEFAULT_ALLOWED_MAX_LENGTH, mask_instructions=False):
    """The book's three loaders: train shuffled with drop_last, val and test in file order.

    Returns (train, val, test) InstructionLoaders; for the book's data at batch size 8
    that is 116 / 7 / 14 batches.
    """
    options = dict(allowed_max_length=allowed_max_length, mask_instructions=mask_instructions,
                   batching=batching)
    train = InstructionLoader(data.train, batch_size, shuffle=True, drop_last=True, seed=seed, **options)
    val = InstructionLoader(data.val, batch_size, **options)
    test = InstructionLoader(data.test, batch_size, **options)
    return train, val, test
