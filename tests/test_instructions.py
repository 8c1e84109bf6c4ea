"""minilora.instructions on the book's real chapter 7 data: split, prompts, collate, files.

The expected numbers (935/110/55, 775 empty inputs, 40..91 tokens, mean 56.4, longest
entry 122, per-split maxima, the first validation instruction) are the ones measured on
the file and written down in shared/data/README.md, not produced by the code under test.
The collate is held against its rule written out here position by position, a different
statement of the book's procedure (which `collate_instructions` follows line by line).
"""

import hashlib
import json
import shutil

import numpy as np
import pytest

from fixtures_data import SHARED_DATA
from minilora.data import DataError
from minilora.instructions import (
    INSTRUCTION_DATA_FILE,
    InstructionLoader,
    collate_instructions,
    download_instruction_data,
    encode_entries,
    format_answer,
    format_input,
    format_training_text,
    load_instructions,
    make_instruction_loaders,
    read_instruction_file,
    split_entries,
    write_responses,
)

PAD = 50256
IGNORE = -100
SHARED_FILE = SHARED_DATA / "instructions" / INSTRUCTION_DATA_FILE
BOOK_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
            "appropriately completes the request.")


@pytest.fixture(scope="module")
def shared_instruction_file(shared_data_dir):
    if not SHARED_FILE.is_file():
        pytest.skip(f"reference data not found: {SHARED_FILE} (set MINILORA_SHARED_DATA to the "
                    f"shared/data folder)")
    return SHARED_FILE


@pytest.fixture(scope="module")
def book_entries(shared_instruction_file):
    """The 1,100 entries as the book reads them (plain json.load of the shared copy)."""
    with open(shared_instruction_file, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def book_data(minilora_home, shared_instruction_file, gpt2_tokenizer):
    """load_instructions() offline from the session cache, seeded with the shared copy."""
    folder = minilora_home / "instructions"
    folder.mkdir(exist_ok=True)
    shutil.copyfile(shared_instruction_file, folder / INSTRUCTION_DATA_FILE)
    return load_instructions(tokenizer=gpt2_tokenizer, offline=True)


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("MINILORA_OFFLINE", raising=False)


def written_out_rows(token_ids, prompt_lengths=None, allowed_max_length=None):
    """The collate's rule position by position, for texts holding no 50256.

    T = the longest text's length n_max (the padded length n_max + 1, minus the shift).
    inputs[t]  = text[t] for t < n, else PAD
    targets[t] = text[t + 1] for t < n - 1; PAD (the <|endoftext|>) at t = n - 1; IGNORE after;
                 IGNORE also for t < P - 1 (the targets that are prompt tokens) when masking.
    """
    T = max(len(ids) for ids in token_ids)
    inputs, targets = [], []
    for b, ids in enumerate(token_ids):
        assert PAD not in ids  # the rule above needs it; encode_ordinary never makes a 50256
        n = len(ids)
        inputs.append([ids[t] if t < n else PAD for t in range(T)])
        row = [ids[t + 1] if t < n - 1 else PAD if t == n - 1 else IGNORE for t in range(T)]
        if prompt_lengths is not None:
            row = [IGNORE if t < prompt_lengths[b] - 1 else v for t, v in enumerate(row)]
        targets.append(row)
    inputs, targets = np.array(inputs), np.array(targets)
    return inputs[:, :allowed_max_length], targets[:, :allowed_max_length]


# ----------------------------------------------------------------------------- the book's numbers


def test_split_counts_and_the_first_validation_entry(book_data, book_entries):
    assert len(book_entries) == 1100
    assert sum(e["input"] == "" for e in book_entries) == 775
    assert (len(book_data.train), len(book_data.test), len(book_data.val)) == (935, 110, 55)
    assert book_data.val.entries[0]["instruction"] == \
        "Convert the active sentence to passive: 'The chef cooks the meal every day.'"
    # in file order: train, then test, then validation
    assert book_data.train.entries == book_entries[:935]
    assert book_data.test.entries == book_entries[935:1045]
    assert book_data.val.entries == book_entries[1045:]
    assert book_data.val.file_indices[0] == 1045


def test_split_entries_is_the_books_arithmetic():
    # int(n*0.85) train, int(n*0.1) test, the rest validation; 10 is the fewest with no split empty
    for n, sizes in [(1100, (935, 55, 110)), (10, (8, 1, 1)), (20, (17, 1, 2)), (99, (84, 6, 9))]:
        train, val, test = split_entries(list(range(n)))
        assert (len(train), len(val), len(test)) == sizes
        assert train + test + val == list(range(n))


def test_token_lengths(book_data):
    lengths = np.concatenate([s.lengths for s in (book_data.train, book_data.test, book_data.val)])
    assert (lengths.min(), lengths.max()) == (40, 91)
    assert round(float(lengths.mean()), 1) == 56.4
    assert int(np.argmax(lengths)) == 122  # the first of the longest, in file order
    assert (book_data.train.lengths.max(), book_data.test.lengths.max(),
            book_data.val.lengths.max()) == (91, 85, 76)
    # nothing is cut at the book's 1024, nor at 91; everything is at 39
    assert book_data.count_longer_than(1024) == {"train": 0, "val": 0, "test": 0}
    assert book_data.count_longer_than(91) == {"train": 0, "val": 0, "test": 0}
    assert book_data.count_longer_than(39) == {"train": 935, "val": 55, "test": 110}


def test_prompt_text_is_alpaca(book_entries):
    with_input = next(e for e in book_entries if e["input"])
    assert format_input(with_input) == (f"{PREAMBLE}\n\n### Instruction:\n{with_input['instruction']}"
                                        f"\n\n### Input:\n{with_input['input']}")
    without = next(e for e in book_entries if not e["input"])
    assert format_input(without) == f"{PREAMBLE}\n\n### Instruction:\n{without['instruction']}"
    assert format_training_text(without) == \
        format_input(without) + "\n\n### Response:\n" + without["output"]


def test_token_ids_and_prompt_lengths_are_the_books(book_data, gpt2_tokenizer):
    """The book's InstructionDataset: encode(full text); exercise 7.2: len(encode(prompt))."""
    for split in book_data.splits:
        for entry, ids, prompt_length in zip(split.entries, split.token_ids, split.prompt_lengths):
            assert ids == gpt2_tokenizer.encode(format_training_text(entry))
            assert prompt_length == len(gpt2_tokenizer.encode(format_input(entry)))


def test_prompt_sharing_a_token_with_the_header(gpt2_tokenizer):
    """An instruction ending in "\\n": its "\\n" and the header's "\\n\\n" encode as "\\n\\n",
    "\\n", so the prompt's own encoding (4 tokens) is no prefix; 3 tokens lie wholly in it."""
    entry = {"instruction": "Say hi.\n", "input": "", "output": "hi"}
    split = encode_entries("train", [entry], gpt2_tokenizer)
    ids, P = split.token_ids[0], int(split.prompt_lengths[0])
    prompt_bytes = format_input(entry).encode()
    inside, straddling = gpt2_tokenizer.decode_bytes(ids[:P]), gpt2_tokenizer.decode_bytes(ids[:P + 1])
    assert prompt_bytes.startswith(inside) and straddling.startswith(prompt_bytes)
    assert len(inside) < len(prompt_bytes) < len(straddling)  # token P holds the prompt's end
    assert P == len(gpt2_tokenizer.encode(format_input(entry))) - 1


# ----------------------------------------------------------------------------- collate


def test_collate_on_real_entries_with_the_longest(book_data):
    train = book_data.train
    rows = [122, 0, 5, 934]  # the longest (91 tokens) with shorter ones
    ids = [train.token_ids[i] for i in rows]
    inputs, targets = collate_instructions(ids)
    assert inputs.dtype == targets.dtype == np.int64
    assert inputs.shape == targets.shape == (4, 91)
    expected_inputs, expected_targets = written_out_rows(ids)
    np.testing.assert_array_equal(inputs, expected_inputs)
    np.testing.assert_array_equal(targets, expected_targets)
    # the longest row is the whole text as inputs, text[1:] + <|endoftext|> as targets
    np.testing.assert_array_equal(targets[0], train.token_ids[122][1:] + [PAD])


def test_ignore_index_placement(book_data):
    ids = [book_data.train.token_ids[i] for i in (122, 1, 2)]
    _, targets = collate_instructions(ids)
    for row, text in zip(targets, ids):
        n = len(text)
        assert row[n - 1] == PAD and (row[:n - 1] != PAD).all()  # one <|endoftext|>, at the end
        assert (row[n:] == IGNORE).all() and (row[:n] != IGNORE).all()


def test_a_text_holding_50256_follows_the_books_first_pad_rule():
    """Worked by hand from the book's code: item [5, 50256, 7], longest 4 -> T = 5:
    padded [5, 50256, 7, 50256, 50256]; inputs [5, 50256, 7, 50256];
    targets [50256, 7, 50256, 50256] -> the 50256s after the first -> [50256, 7, -100, -100]."""
    inputs, targets = collate_instructions([[5, PAD, 7], [1, 2, 3, 4]])
    np.testing.assert_array_equal(inputs, [[5, PAD, 7, PAD], [1, 2, 3, 4]])
    np.testing.assert_array_equal(targets, [[PAD, 7, IGNORE, IGNORE], [2, 3, 4, PAD]])


def test_truncation(book_data):
    ids = [book_data.train.token_ids[i] for i in (122, 3, 4)]
    full_inputs, full_targets = collate_instructions(ids, allowed_max_length=None)
    inputs, targets = collate_instructions(ids, allowed_max_length=50)
    assert inputs.shape == targets.shape == (3, 50)
    np.testing.assert_array_equal(inputs, full_inputs[:, :50])
    np.testing.assert_array_equal(targets, full_targets[:, :50])
    expected_inputs, expected_targets = written_out_rows(ids, allowed_max_length=50)
    np.testing.assert_array_equal(targets, expected_targets)
    # above the batch's length, truncation changes nothing
    for limit in (91, 1024):
        _, targets = collate_instructions(ids, allowed_max_length=limit)
        np.testing.assert_array_equal(targets, full_targets)


def test_mask_instructions(book_data, gpt2_tokenizer):
    split = book_data.test
    rows = [0, 1, int(np.argmax(split.lengths))]
    ids = [split.token_ids[i] for i in rows]
    prompt_lengths = split.prompt_lengths[rows]
    inputs, targets = collate_instructions(ids, prompt_lengths)
    np.testing.assert_array_equal(targets, written_out_rows(ids, prompt_lengths)[1])
    np.testing.assert_array_equal(inputs, collate_instructions(ids)[0])  # inputs untouched
    for row, i in zip(targets, rows):
        kept = row[row != IGNORE]
        # what is still learned is the header, the output and the stop, and nothing else
        assert kept[-1] == PAD
        response = "\n\n### Response:\n" + split.entries[i]["output"]
        assert gpt2_tokenizer.decode(kept[:-1].tolist()) == response


def test_a_text_left_without_targets_is_refused(book_data):
    split = book_data.val
    longest_prompt = int(split.prompt_lengths.max())
    # targets 0..A-1 survive truncation; masking hides 0..P-2: none is left when A <= P - 1
    with pytest.raises(DataError) as info:
        InstructionLoader(split, allowed_max_length=longest_prompt - 1, mask_instructions=True)
    message = str(info.value)
    entry = int(split.file_indices[int(np.argmax(split.prompt_lengths >= longest_prompt))])
    assert f"entry {entry}:" in message and book_data.source in message and "\n" not in message
    # one more position keeps the header's first token: accepted; without masking, always
    loader = InstructionLoader(split, allowed_max_length=longest_prompt, mask_instructions=True)
    for _, targets in loader:
        assert ((targets != IGNORE).sum(axis=1) >= 1).all()
    InstructionLoader(split, allowed_max_length=1)


# ----------------------------------------------------------------------------- loaders


def test_loaders_are_the_books(book_data):
    train, val, test = make_instruction_loaders(book_data)
    assert (len(train), len(val), len(test)) == (935 // 8, 7, 14)  # train drops its last 7
    # evaluation in file order, every entry once
    val_inputs = np.concatenate([inputs[:, :1] for inputs, _ in val])
    assert len(val_inputs) == 55
    first_inputs, first_targets = next(iter(val))
    ids = book_data.val.token_ids[:8]
    np.testing.assert_array_equal(first_targets, written_out_rows(ids)[1])
    np.testing.assert_array_equal(first_inputs, written_out_rows(ids)[0])


def test_training_batches_are_seeded_and_restartable(book_data):
    train, _, _ = make_instruction_loaders(book_data, seed=7)
    epoch0 = list(train.epoch_batches(0))
    again = list(make_instruction_loaders(book_data, seed=7)[0].epoch_batches(0))
    for (a_in, a_tg), (b_in, b_tg) in zip(epoch0, again):
        np.testing.assert_array_equal(a_in, b_in)
        np.testing.assert_array_equal(a_tg, b_tg)
    # every batch is the written-out rule on the texts of that batch of the epoch's order
    order = train.order(0)
    for b, (inputs, targets) in enumerate(epoch0):
        ids = [book_data.train.token_ids[i] for i in order[b * 8:(b + 1) * 8]]
        np.testing.assert_array_equal(targets, written_out_rows(ids)[1])
    assert [t.shape[1] for _, t in epoch0] == train.batch_lengths(0).tolist()
    assert not np.array_equal(order, train.order(1))  # a new order each epoch
    resumed = list(train.epoch_batches(0, start=100))
    assert len(resumed) == len(epoch0) - 100
    np.testing.assert_array_equal(resumed[0][1], epoch0[100][1])
    train.set_epoch(3)
    np.testing.assert_array_equal(next(iter(train))[1], next(train.epoch_batches(3))[1])


def test_loader_truncates_and_masks(book_data):
    train, _, _ = make_instruction_loaders(book_data, allowed_max_length=60, mask_instructions=True)
    order = train.order(0)
    for b, (inputs, targets) in enumerate(train.epoch_batches(0)):
        rows = order[b * 8:(b + 1) * 8]
        ids = [book_data.train.token_ids[i] for i in rows]
        expected = written_out_rows(ids, book_data.train.prompt_lengths[rows], allowed_max_length=60)
        np.testing.assert_array_equal(inputs, expected[0])
        np.testing.assert_array_equal(targets, expected[1])
        assert inputs.shape[1] <= 60
    assert train.batch_lengths(0).max() == 60


# ----------------------------------------------------------------------------- your own file


def write_entries(path, entries):
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


GOOD = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}


def test_own_json_and_jsonl_files(tmp_path, gpt2_tokenizer):
    entries = [dict(GOOD, output=str(i)) for i in range(12)]
    del entries[3]["input"]  # a missing input is no input
    entries[4]["input"] = None
    as_json = write_entries(tmp_path / "mine.json", entries)
    as_jsonl = tmp_path / "mine.jsonl"
    as_jsonl.write_text("\n".join(json.dumps(e) for e in entries) + "\n\n", encoding="utf-8")
    lines_in_a_json = tmp_path / "lines.json"
    lines_in_a_json.write_text(as_jsonl.read_text(), encoding="utf-8")
    expected = [dict(GOOD, output=str(i)) for i in range(12)]
    expected[3]["input"] = expected[4]["input"] = ""
    for path in (as_json, as_jsonl, lines_in_a_json):
        assert read_instruction_file(path) == expected
    data = load_instructions(as_jsonl, tokenizer=gpt2_tokenizer)
    assert (len(data.train), len(data.test), len(data.val)) == (10, 1, 1)
    assert data.source == str(as_jsonl)


@pytest.mark.parametrize("content, problem", [
    ("", "is empty"),
    ("  \n", "is empty"),
    ("[]", "holds an empty list"),
    (json.dumps(GOOD, indent=2), "expected a JSON list of {instruction, input, output} objects "
                                 "(or JSONL, one object per line), found a JSON object"),
    (json.dumps([GOOD, ["a", "b"]]), "entry 1: expected an object {instruction, input, output}, "
                                     "found a JSON array"),
    (json.dumps([GOOD, {"instruction": "x", "input": ""}]), "entry 1: missing key 'output'"),
    (json.dumps([GOOD, GOOD, {"input": "", "output": "y"}]), "entry 2: missing key 'instruction'"),
    (json.dumps([dict(GOOD, output=5)]), "entry 0: 'output' must be a string, found a JSON number"),
    (json.dumps([dict(GOOD, instruction=None)]), "entry 0: 'instruction' must be a string, "
                                                 "found a JSON null"),
    (json.dumps([dict(GOOD, input=["x"])]), "entry 0: 'input' must be a string, found a JSON array"),
    (json.dumps([GOOD, dict(GOOD, output="  ")]), "entry 1: empty output"),
    (json.dumps([dict(GOOD, instruction="")]), "entry 0: empty instruction"),
    ('[{"instruction": "x",', "is not valid JSON: Expecting"),
], ids=["empty", "blank", "empty_list", "an_object", "entry_not_object", "no_output",
        "no_instruction", "output_number", "instruction_null", "input_list", "empty_output",
        "empty_instruction", "broken_json"])
def test_bad_json_file_gives_one_line(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_instruction_file(path)
    message = str(info.value)
    assert message.startswith(str(path)) and problem in message and "\n" not in message


def test_bad_jsonl_names_entry_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(dict(GOOD, output="")) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: entry 1 \(line 3\): empty output$"):
        read_instruction_file(path)
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 is not valid JSON"):
        read_instruction_file(path)


def test_missing_file_and_too_few_entries(tmp_path, gpt2_tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        read_instruction_file(tmp_path / "nowhere.json")
    with pytest.raises(DataError, match="is not a file"):
        read_instruction_file(tmp_path)
    (tmp_path / "latin1.json").write_bytes('[{"instruction": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8"):
        read_instruction_file(tmp_path / "latin1.json")
    path = write_entries(tmp_path / "nine.json", [GOOD] * 9)  # int(9 * 0.1) = 0 test entries
    with pytest.raises(DataError, match="nine.json: 9 entries leave the test split empty"):
        load_instructions(path, tokenizer=gpt2_tokenizer)


# ----------------------------------------------------------------------------- answers


def test_format_answer_is_the_books():
    prompt = format_input(GOOD)
    generated = prompt + "\n\n### Response:\nThe sum is 5.  \n"
    assert format_answer(generated, prompt) == "The sum is 5."
    assert format_answer(prompt + " 5", prompt) == "5"  # no header generated: the text as is


def test_write_responses(tmp_path, book_data):
    entries = book_data.test.entries[:3]
    path = write_responses(tmp_path / "instruction-data-with-response.json", entries, ["a", "b", "c"])
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == [dict(e, model_response=r) for e, r in zip(entries, "abc")]
    assert text.startswith('[\n    {\n        "instruction": ')  # the book's indent=4
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left
    with pytest.raises(ValueError, match="3 entries but 2 responses"):
        write_responses(tmp_path / "x.json", entries, ["a", "b"])


# ----------------------------------------------------------------------------- download


def test_download_from_a_local_server(empty_minilora_home, online, local_http_server,
                                      shared_instruction_file):
    url = local_http_server.add("/instruction-data.json", shared_instruction_file.read_bytes())
    path = download_instruction_data(url)
    assert path == empty_minilora_home / "instructions" / "instruction-data.json"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == BOOK_SHA256
    # once there, the file is used as is: no second request, also offline
    assert download_instruction_data(url, offline=True) == path
    assert download_instruction_data(url) == path
    assert local_http_server.requests == ["/instruction-data.json"]


def flip_one_bit(body):
    body = bytearray(body)
    body[1000] ^= 1  # same size, one bit off: only the sha256 can tell
    return bytes(body)


@pytest.mark.parametrize("damage, problem", [
    (flip_one_bit, "its sha256 is"),
    (lambda body: body[:1000], "it has 1,000 bytes, expected 203,524"),  # a complete but short body
], ids=["one_bit", "short"])
def test_a_corrupt_download_leaves_nothing(empty_minilora_home, online, local_http_server,
                                           shared_instruction_file, damage, problem):
    url = local_http_server.add("/instruction-data.json", damage(shared_instruction_file.read_bytes()))
    with pytest.raises(DataError, match=problem) as info:
        download_instruction_data(url)
    path = empty_minilora_home / "instructions" / "instruction-data.json"
    assert f"put {INSTRUCTION_DATA_FILE} at {path}" in str(info.value)
    folder = path.parent
    assert not folder.exists() or list(folder.iterdir()) == []


def test_offline_refusal_names_the_path(empty_minilora_home, local_http_server, monkeypatch):
    monkeypatch.setenv("MINILORA_OFFLINE", "1")
    url = local_http_server.url("/instruction-data.json")
    with pytest.raises(DataError) as info:
        load_instructions(url=url)
    message = str(info.value)
    path = empty_minilora_home / "instructions" / "instruction-data.json"
    assert f"put {INSTRUCTION_DATA_FILE} at {path}." in message and "\n" not in message
    assert local_http_server.requests == []
