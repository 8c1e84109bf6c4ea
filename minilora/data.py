"""Text-classification data: the SMS Spam Collection as the book prepares it, or your own file.

The pipeline of the book's chapter 6 / appendix E ("Build a Large Language Model
(From Scratch)", Raschka: ch06 `download_and_unzip_spam_data`,
`create_balanced_dataset`, `random_split`, `SpamDataset`, `DataLoader`), without
PyTorch:

1. download the zip from UCI and extract SMSSpamCollection into
   $MINILORA_HOME/sms_spam/ (both steps atomic; an existing file is used as is);
2. parse it with ``pd.read_csv(sep="\\t", header=None)``: 5,572 rows (4,825 ham,
   747 spam; pandas' quote handling merges a few of the 5,574 lines, exactly as in
   the book);
3. balance: sample 747 ham (random_state=123) and keep all 747 spam; ham -> 0, spam -> 1;
4. shuffle (frac=1, random_state=123) and split 70/10/20 -> 1,045 / 149 / 300;
5. encode with GPT-2 BPE; pad with <|endoftext|> (50256) to the longest training
   text (120 tokens), truncating validation/test texts to that length;
6. batches of 8; the training batches are shuffled and the last incomplete one is
   dropped -> 130 / 19 / 38 batches.

Beyond the book, batches can be grouped by length (``batching="by_length"``: training
batches from a "sortish" order shuffled every epoch, evaluation batches in a fixed order;
see `BatchLoader.order`) so that, padded per batch, they carry little padding.

A batch is three NumPy int64 arrays: token ids (B, T), labels (B,) and the
position of each text's last real token (B,). The book classifies from position
-1, which for a padded text is a pad token; `last_index` lets a model classify
from the last real token instead.

`load_text_label_file` takes the same path from step 4 on for a CSV/TSV file of
``text,label`` rows with any number of classes.

Data: Almeida & Gomez Hidalgo, "Contributions to the Study of SMS Spam
Filtering" (2011); UCI Machine Learning Repository, CC BY 4.0.
"""

import re
import shutil
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from .cache import cache_dir, is_offline
from .download import DownloadError, download
from .errors import MiniloraError
from .files import atomic_path
from .tokenizer import END_OF_TEXT_ID, encode_texts, get_tokenizer

SMS_SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_SPAM_FILE = "SMSSpamCollection"
SMS_SPAM_ZIP = "sms+spam+collection.zip"
SMS_CLASS_NAMES = ("ham", "spam")  # label ids 0 and 1, as in the book
SPLITS = ("train", "val", "test")
PAD_MODES = ("dataset", "longest_in_batch")
BATCHINGS = ("shuffled", "by_length")
# by_length sorts each chunk of this many batches' worth of examples (in shuffled order) by
# length: the "megabatch" of Hugging Face's LengthGroupedSampler and fastai's SortishSampler
BY_LENGTH_CHUNK_BATCHES = 50
# how pandas, R, spreadsheets and databases write a missing value (compared lower-cased)
MISSING_VALUE_SPELLINGS = ("nan", "na", "n/a", "null", "none", "nil", "#n/a")


class DataError(MiniloraError, RuntimeError):
    """A data file is missing, cannot be downloaded, or is not in the expected format."""


# ----------------------------------------------------------------------------- SMS Spam Collection


def download_sms_spam(url=SMS_SPAM_URL, *, folder=None, offline=None, progress=None):
    """Return the path of SMSSpamCollection, downloading and extracting it if needed.

    folder:   where it lives (default $MINILORA_HOME/sms_spam); a file already there
              is used without any network access.
    url:      the zip to download (UCI's by default; tests serve one locally).
    offline:  never download (default: $MINILORA_OFFLINE).
    progress: progress bar for the download (None: only on a terminal).
    """
    folder = Path(folder) if folder is not None else cache_dir("sms_spam")
    path = folder / SMS_SPAM_FILE
    if path.is_file():
        return path
    offline = is_offline() if offline is None else offline
    zip_path = folder / SMS_SPAM_ZIP
    try:
        download(url, zip_path, offline=offline, progress=progress)
    except DownloadError as exc:
        raise DataError(f"the SMS Spam Collection is not in {folder} and cannot be downloaded: "
                        f"{exc}\nAlternatively put the file {SMS_SPAM_FILE} from that zip at "
                        f"{path}.") from exc
    _extract_zip(zip_path, folder, required=SMS_SPAM_FILE, optional=("readme",))
    zip_path.unlink()  # the extracted file is what we keep; the zip would only be stale
    return path


def _extract_zip(zip_path, folder, *, required, optional=()):
    """Extract members (matched by base name, so a folder inside the zip is fine) atomically.

    Only our own file names are written, so a malicious member path ("../x") cannot
    escape `folder`. The required member is written last: its presence means done.
    A damaged zip, or one without the required member, is deleted (so that the next
    call downloads it again) together with whatever this call extracted from it.
    """
    written = []
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = {Path(m).name: m for m in archive.namelist() if not m.endswith("/")}
            if required not in members:
                raise DataError(f"{zip_path} holds no {required} (it holds {sorted(members)}); "
                                f"it was deleted")
            for name in [n for n in optional if n in members] + [required]:
                with atomic_path(folder / name) as tmp:
                    with open(tmp, "wb") as out, archive.open(members[name]) as src:
                        shutil.copyfileobj(src, out)
                written.append(folder / name)
    # A damaged archive fails at opening (BadZipFile), or while inflating a member
    # (BadZipFile for a bad CRC, EOFError or zlib.error for a cut-off stream).
    except (DataError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        for path in written + [zip_path]:
            path.unlink(missing_ok=True)
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{zip_path} is not a valid zip file ({exc}); it was deleted, "
                        f"try again") from exc


def read_sms_spam(path):
    """Parse SMSSpamCollection exactly as the book does: DataFrame with columns Label, Text.

    Labels stay the strings "ham"/"spam" here (the book maps them after balancing).
    """
    path = Path(path)
    df = _read_csv(path, sep="\t", header=None, names=["Label", "Text"])
    labels = set(df["Label"].unique())
    if not labels <= set(SMS_CLASS_NAMES) or df["Text"].isna().any() or len(labels) < 2:
        found = sorted(map(str, labels))[:5]
        raise DataError(f"{path} is not the SMS Spam Collection: expected tab-separated "
                        f"'ham'/'spam' labels followed by a text, found labels {found}")
    return df


def create_balanced_dataset(df, random_state=123):
    """The book's balancing: sample as many ham as there are spam, then all spam.

    Returns a new DataFrame with Label mapped ham -> 0, spam -> 1 (int64).
    """
    num_spam = int((df["Label"] == "spam").sum())
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=random_state)
    balanced = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1}).astype(np.int64)
    return balanced


def random_split(df, train_frac=0.7, validation_frac=0.1, random_state=123):
    """The book's split: shuffle all rows, then cut train / validation / the rest as test."""
    df = df.sample(frac=1, random_state=random_state).reset_index(drop=True)
    train_end = int(len(df) * train_frac)
    validation_end = train_end + int(len(df) * validation_frac)
    return df[:train_end], df[train_end:validation_end], df[validation_end:]


# ----------------------------------------------------------------------------- your own data


def read_text_label_file(path):
    """Read a CSV (.csv) or TSV (.tsv/.tab/.txt with tabs) file of text,label rows.

    A first row naming the columns `text` and `label` (any order, any case; other
    columns are ignored; none named twice) is a header; without one, each row must be
    exactly `text,label`. Labels are any strings; they become ints 0..K-1 in sorted order
    (numeric order when all of them are integers, so "10" comes after "9"). A file read
    as comma-separated that cannot be parsed so, and whose lines hold tabs, is reported
    with the advice to name it .tsv.

    Returns (DataFrame with columns Text (str) and Label (int64), class_names tuple).
    Raises DataError naming the file and the problem.
    """
    path = Path(path)
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    if path.suffix.lower() not in (".csv", ".tsv", ".tab") and path.is_file():
        with open(path, encoding="utf-8", errors="replace") as f:
            sep = "\t" if "\t" in f.readline() else ","
    hint = _tab_hint(path) if sep == "," else ""
    # dtype=str and no NA parsing: a text "NA" or "null" is text, not a missing value.
    raw = _read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False, hint=hint)
    first = [str(v).strip().lower() for v in raw.iloc[0]]
    if "text" in first and "label" in first:
        _refuse_repeated_names(path, first)
        columns = {"Text": first.index("text"), "Label": first.index("label")}
        raw, first_line = raw.iloc[1:], 2
    elif raw.shape[1] == 2:
        columns, first_line = {"Text": 0, "Label": 1}, 1
    else:
        row = "text<TAB>label" if sep == "\t" else "text,label"
        raise DataError(f"{path}: expected rows of {row} (or a header row naming 'text' and 'label'), "
                        f"found {raw.shape[1]} columns in the first row{hint}")
    df = pd.DataFrame({"Text": raw.iloc[:, columns["Text"]].to_numpy(dtype=object),
                       "Label": raw.iloc[:, columns["Label"]].to_numpy(dtype=object)})
    if df.empty:
        raise DataError(f"{path} holds a header but no rows")
    df["Label"] = df["Label"].map(lambda v: "" if pd.isna(v) else str(v).strip())
    for column in ("Text", "Label"):
        empty = df[column].map(lambda v: pd.isna(v) or str(v).strip() == "").to_numpy()
        if empty.any():
            rows = (np.flatnonzero(empty) + first_line)[:5].tolist()
            raise DataError(f"{path}: empty {column.lower()} in row(s) {rows} "
                            f"(counting the file's rows from 1)")
    names = sorted(set(df["Label"]))
    suspicious = [n for n in names if n.lower() in MISSING_VALUE_SPELLINGS]
    if suspicious:  # pandas and spreadsheets write a missing value as NaN: probably not a class
        warnings.warn(f"{path}: the label(s) {suspicious} look like missing values, yet each is "
                      f"kept as a class of its own; fix or drop those rows if they are not real labels",
                      stacklevel=2)
    if all(re.fullmatch(r"[+-]?\d+", n) for n in names):
        names = sorted(names, key=int)
    if len(names) < 2:
        raise DataError(f"{path}: a classifier needs at least 2 classes, found only {names}")
    df["Label"] = df["Label"].map({n: i for i, n in enumerate(names)}).astype(np.int64)
    df["Text"] = df["Text"].astype(str)
    return df.reset_index(drop=True), tuple(names)


def refuse_single_example_classes(df, class_names, source):
    """Raise DataError when more than half of the classes have a single example.

    A classifier needs at least 2 examples of a class to be trained and validated on it:
    a class seen once lands in one split only, so it is either learned and never measured,
    or measured and never learned. A real dataset may have a rare class or two like that,
    and passes (so does a small one: 10 rows of 2 classes); but when most classes are
    single examples, the column read as labels holds something unique to each row (the
    texts, row ids): the file was misread. E.g. the raw SMSSpamCollection (label<TAB>text,
    no header) read as text,label makes each of its ~5,000 distinct texts a class.
    """
    counts = np.bincount(df["Label"].to_numpy(), minlength=len(class_names))
    single = int((counts == 1).sum())
    if single > len(class_names) / 2:
        example = str(class_names[int(np.flatnonzero(counts == 1)[0])])
        example = example if len(example) <= 40 else example[:37] + "..."
        raise DataError(f"{source}: {single:,} of the {len(class_names):,} classes have a single example "
                        f"(e.g. {example!r}): is the header missing, or is the label column the text? "
                        f"A class needs at least 2 examples, to be trained and validated on")


def _refuse_repeated_names(path, header):
    """Refuse a header naming a column twice ("label,label,text"): which of the two holds
    the labels would be a guess (the first was read, and made every row id a class).
    Unnamed columns (a spreadsheet's trailing commas) may repeat."""
    for name in dict.fromkeys(header):
        where = [i + 1 for i, n in enumerate(header) if n == name]
        if name and len(where) > 1:
            raise DataError(f"{path}: the header names the column {name!r} {len(where)} times "
                            f"(columns {where}); each column name must appear once")


# how many of the first lines `_tab_hint` looks at: enough to see past a header or a blank line
TAB_HINT_LINES = 5


def _tab_hint(path):
    """For a file read as comma-separated: when its first lines hold tabs, the words that
    say so (appended to a parse error, which alone would only say "Expected 2 fields in
    line 12, saw 4"), else ''. A name ending in .tsv or .tab is what selects tabs; any
    other name is sniffed from its first line."""
    if not path.is_file():
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [f.readline() for _ in range(TAB_HINT_LINES)]
    if not any("\t" in line for line in lines):
        return ""
    return (f"; its lines hold tabs, but a file named {path.name} is read as comma-separated: "
            f"name it {path.stem}.tsv to read it as tab-separated")


def _read_csv(path, *, hint="", **kwargs):
    """pd.read_csv, with every way it can fail turned into a DataError naming the file;
    `hint` ends the message of a file that cannot be parsed."""
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    try:
        df = pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path} is empty") from exc
    except pd.errors.ParserError as exc:
        # pandas ends its message with a newline: one line of it, so that the error stays one line
        reason = " ".join(str(exc).split())
        raise DataError(f"{path} is malformed: {reason}{hint}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc})") from exc
    if df.empty:
        raise DataError(f"{path} is empty")
    return df


# ----------------------------------------------------------------------------- tokenized splits


@dataclass
class Split:
    """One split, tokenized: what the book's SpamDataset holds, minus the padding.

    Padding happens per batch (`collate`), so one Split serves both padding modes.
    """

    name: str               # "train", "val" or "test"
    texts: list             # the raw texts, N strings
    labels: np.ndarray      # (N,) int64 class ids
    token_ids: list         # N lists of GPT-2 ids, each truncated to max_length, not padded
    max_length: int         # the length pad_to="dataset" pads every batch to
    pad_token_id: int = END_OF_TEXT_ID
    truncated: int = 0      # texts that were longer than max_length (cut to it)

    def __len__(self):
        return len(self.texts)

    @property
    def lengths(self):
        """(N,) int64: tokens per text after truncation (the pad-free lengths)."""
        return np.array([len(ids) for ids in self.token_ids], dtype=np.int64)


@dataclass
class ClassificationData:
    """Train / validation / test splits plus the class names (index = label id)."""

    train: Split
    val: Split
    test: Split
    class_names: tuple      # e.g. ("ham", "spam")
    source: str             # the file the texts came from

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def max_length(self):
        return self.train.max_length

    @property
    def truncated(self):
        """{split name: texts cut to max_length} (val and test are cut to the training length)."""
        return {s.name: s.truncated for s in (self.train, self.val, self.test)}


def encode_split(name, texts, labels, tokenizer, *, max_length=None, pad_token_id=END_OF_TEXT_ID):
    """Tokenize texts like the book's SpamDataset: max_length None means the longest text.

    `encode_texts` gives the same ids as the book's encode() for every SMS text, and
    treats a literal "<|endoftext|>" in a user's text as text instead of raising.
    """
    texts = [str(t) for t in texts]
    token_ids = encode_texts(tokenizer, texts)
    if max_length is None:
        max_length = max(len(ids) for ids in token_ids)
    truncated = sum(len(ids) > max_length for ids in token_ids)
    token_ids = [ids[:max_length] for ids in token_ids]
    return Split(name=name, texts=texts, labels=np.asarray(labels, dtype=np.int64),
                 token_ids=token_ids, max_length=int(max_length), pad_token_id=pad_token_id,
                 truncated=int(truncated))


def make_splits(df, class_names, tokenizer, *, source="", max_length=None, context_length=1024,
                train_frac=0.7, validation_frac=0.1, random_state=123):
    """Split a (Text, Label int) DataFrame 70/10/20 the book's way and tokenize each part.

    max_length None pads to the longest training text, as the book does, but at
    most `context_length` tokens (the model's): longer texts would not fit GPT-2's
    position table, so they are truncated, as the book's SpamDataset truncates to
    its max_length (`ClassificationData.truncated` counts them). Validation and test
    texts are truncated to the training max_length.
    """
    if max_length is not None and not 1 <= max_length <= context_length:
        raise ValueError(f"max_length must be between 1 and the model's context length "
                         f"{context_length}, got {max_length}")
    parts = random_split(df, train_frac, validation_frac, random_state)
    for part_name, part in zip(("train", "val", "test"), parts):
        if len(part) == 0:
            raise DataError(f"{source or 'the data'}: {len(df)} rows leave the {part_name} split "
                            f"empty; at least 10 rows are needed")
    train_df, val_df, test_df = parts
    train = encode_split("train", train_df["Text"], train_df["Label"], tokenizer, max_length=max_length)
    if train.max_length > context_length:
        train = encode_split("train", train_df["Text"], train_df["Label"], tokenizer,
                             max_length=context_length)
    val = encode_split("val", val_df["Text"], val_df["Label"], tokenizer,
                       max_length=train.max_length)
    test = encode_split("test", test_df["Text"], test_df["Label"], tokenizer,
                        max_length=train.max_length)
    return ClassificationData(train=train, val=val, test=test, class_names=tuple(class_names),
                              source=str(source))


def load_sms_spam(*, url=SMS_SPAM_URL, folder=None, tokenizer=None, max_length=None,
                  context_length=1024, random_state=123, offline=None, progress=None):
    """The appendix E data: SMS Spam Collection, balanced, split, tokenized -> ClassificationData.

    Downloads (or reuses) the file as `download_sms_spam` does; the tokenizer
    defaults to `get_tokenizer()`. With the defaults: 1,045 / 149 / 300 examples,
    max_length 120.
    """
    path = download_sms_spam(url, folder=folder, offline=offline, progress=progress)
    if tokenizer is None:
        tokenizer = get_tokenizer(offline=offline, progress=progress)
    balanced = create_balanced_dataset(read_sms_spam(path), random_state=random_state)
    return make_splits(balanced, SMS_CLASS_NAMES, tokenizer, source=path, max_length=max_length,
                       context_length=context_length, random_state=random_state)


def load_text_label_file(path, *, tokenizer=None, max_length=None, context_length=1024,
                         random_state=123, offline=None, progress=None):
    """Your own CSV/TSV of text,label rows (see `read_text_label_file`) -> ClassificationData.

    Split 70/10/20 and tokenized exactly like the SMS data, without balancing. Refuses
    a file most of whose classes have a single example (`refuse_single_example_classes`).
    """
    df, class_names = read_text_label_file(path)
    refuse_single_example_classes(df, class_names, path)
    if tokenizer is None:
        tokenizer = get_tokenizer(offline=offline, progress=progress)
    return make_splits(df, class_names, tokenizer, source=path, max_length=max_length,
                       context_length=context_length, random_state=random_state)


# ----------------------------------------------------------------------------- batches


def collate(split, indices, pad_to="dataset"):
    """Pad the texts split.token_ids[indices] into one batch.

    pad_to: "dataset" pads to split.max_length (the book); "longest_in_batch" pads
            only to the longest text of this batch (less work, same logits at the
            real tokens since attention is causal).
    Returns (idx (B, T) int64, labels (B,) int64, last_index (B,) int64), where
    last_index[b] is the position of text b's last real (non-pad) token.
    """
    if pad_to not in PAD_MODES:
        raise ValueError(f"pad_to must be one of {PAD_MODES}, got {pad_to!r}")
    indices = np.asarray(indices, dtype=np.int64)
    lengths = np.array([len(split.token_ids[i]) for i in indices], dtype=np.int64)
    T = split.max_length if pad_to == "dataset" else max(int(lengths.max(initial=0)), 1)
    idx = np.full((len(indices), T), split.pad_token_id, dtype=np.int64)  # (B, T)
    for row, i in enumerate(indices):
        idx[row, :lengths[row]] = split.token_ids[i]
    labels = split.labels[indices]  # (B,)
    last_index = np.maximum(lengths - 1, 0)  # (B,); an empty text points at its first pad
    return idx, labels, last_index


class BatchLoader:
    """Iterate over a Split in batches, like torch's DataLoader with num_workers=0.

    split:     the examples: anything with len() and `lengths` ((N,) int64 tokens per
               example, which by_length groups by), and `max_length` for `batch_lengths`
               with pad_to="dataset".
    collate_fn: collate_fn(split, indices) -> one batch, a tuple whose first entry is the
               (B, T) token ids (torch's name); None: the classifier's `collate` with
               pad_to. The book's chapter 7 puts its masking in this function, so one
               loader (its shuffling, length grouping, resumable epochs) serves every job.
    shuffle:   a new order every epoch from a NumPy Generator seeded with (seed, epoch),
               so a run is reproducible and a resumed run can continue with the same
               order (`set_epoch`, `epoch_batches`). Each `iter()` uses the current
               epoch, then advances it.
    drop_last: leave out the last incomplete batch (the book does so for training).
    pad_to:    "dataset" or "longest_in_batch" (see `collate`; and `batch_lengths`).
    batching:  "shuffled" (the book: consecutive examples of the shuffled order) or
               "by_length" (texts of similar length batched together; see `order`). Only
               padding per batch turns the grouping into less work; the loader does not
               insist on it (FinetuneOptions does).
    Yields what collate_fn returns: by default (idx (B, T), labels (B,), last_index (B,)),
    all int64 NumPy arrays.
    """

    def __init__(self, split, batch_size=8, *, collate_fn=None, shuffle=False, drop_last=False, seed=123,
                 pad_to="dataset", batching="shuffled"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if pad_to not in PAD_MODES:
            raise ValueError(f"pad_to must be one of {PAD_MODES}, got {pad_to!r}")
        if batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {BATCHINGS}, got {batching!r}")
        self.split = split
        self.batch_size = batch_size
        self.collate_fn = collate_fn or partial(collate, pad_to=pad_to)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.pad_to = pad_to
        self.batching = batching
        self.epoch = 0

    def __len__(self):
        if self.drop_last:
            return len(self.split) // self.batch_size
        return -(-len(self.split) // self.batch_size)

    def set_epoch(self, epoch):
        """Make the next iteration use epoch `epoch`'s order (to resume a run)."""
        self.epoch = int(epoch)

    def order(self, epoch):
        """The example indices of epoch `epoch`, in the order they are batched: batch b is
        order[b * batch_size:(b + 1) * batch_size]. Always a permutation of every example.

        by_length, shuffled (a "sortish" sampler): the epoch's shuffled order is cut into
        its full batches' worth of examples and the remainder (the book's drop_last leaves
        out the same random remainder); the full part is sorted by length within chunks of
        BY_LENGTH_CHUNK_BATCHES batches (stable, so equal lengths keep their random order),
        cut into batches, and the batches are shuffled. Sorting within chunks rather than
        the whole split pads a little more (31.7 instead of 30.9 tokens on the SMS training
        split at batch 8) but halves how often two texts share a batch again the next epoch
        (15% of the pairs instead of 29%).
        by_length, not shuffled (evaluation): sorted by length, cut into batches, the full
        batches in a fixed order that does not depend on the seed (so that evaluating an
        adapter later rebuilds the same batches) and is not by length (so that the first
        few batches, which the training loop evaluates, are not all the shortest texts);
        the incomplete batch, if any, last.
        """
        n, B = len(self.split), self.batch_size
        if not self.shuffle:
            if self.batching == "shuffled":
                return np.arange(n)
            by_length = np.argsort(self.split.lengths, kind="stable")
            full = by_length[:n // B * B].reshape(-1, B)  # [n_full, B]
            return np.concatenate([full[np.random.default_rng(0).permutation(n // B)].ravel(),
                                   by_length[n // B * B:]])
        # Seeding with the pair (seed, epoch) rather than seed + epoch keeps seed 1 epoch 0
        # and seed 0 epoch 1 from sharing an order.
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n)
        if self.batching == "shuffled":
            return order
        full, rest = order[:n // B * B], order[n // B * B:]
        lengths = self.split.lengths
        chunk = BY_LENGTH_CHUNK_BATCHES * B
        sorted_full = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                                      for c in np.split(full, range(chunk, len(full), chunk))])
        batches = sorted_full.reshape(-1, B)[rng.permutation(n // B)]  # [n_full, B]
        return np.concatenate([batches.ravel(), rest[np.argsort(lengths[rest], kind="stable")]])

    def batch_lengths(self, epoch):
        """(len(self),) int64: the padded length T of each batch of epoch `epoch`."""
        if self.pad_to == "dataset":
            return np.full(len(self), self.split.max_length, dtype=np.int64)
        lengths = self.split.lengths[self.order(epoch)]
        B = self.batch_size
        return np.array([max(int(lengths[b * B:(b + 1) * B].max()), 1) for b in range(len(self))],
                        dtype=np.int64)

    def epoch_batches(self, epoch, start=0):
        """The batches of epoch `epoch` from batch number `start` on (to resume mid-epoch).

        Leaves `self.epoch` alone: the same epoch can be replayed any number of times.
        """
        order = self.order(epoch)
        for b in range(start, len(self)):
            yield self.collate_fn(self.split, order[b * self.batch_size:(b + 1) * self.batch_size])

    def __iter__(self):
        # The epoch advances when iteration starts, not when the generator is first used.
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.epoch_batches(epoch)


def make_loaders(data, batch_size=8, *, seed=123, pad_to="dataset", batching="shuffled"):
    """The book's three loaders: train shuffled with drop_last, val and test in order.

    batching "by_length" groups the texts of every loader by length (see `BatchLoader.order`):
    evaluated in the book's order, with the last position read (pool "last") and per-batch
    padding, a text is followed by as many pads as its batch's longest text demands, ~25 on
    SMS, where training grouped by length showed it ~1; a tiny model trained by length then
    scores ~54% instead of ~85% (benchmarks/README.md).
    Returns (train, val, test) BatchLoaders; for the SMS data at batch size 8 that is
    130 / 19 / 38 batches.
    """
    train = BatchLoader(data.train, batch_size, shuffle=True, drop_last=True, seed=seed,
                        pad_to=pad_to, batching=batching)
    val = BatchLoader(data.val, batch_size, pad_to=pad_to, batching=batching)
    test = BatchLoader(data.test, batch_size, pad_to=pad_to, batching=batching)
    return train, val, test
