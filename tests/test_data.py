"""minilora.data on the real SMS Spam Collection: the book's numbers, batches, your own files."""

import hashlib

import numpy as np
import pytest

from fixtures_data import make_sms_zip
from minilora.data import (
    SMS_CLASS_NAMES,
    BatchLoader,
    DataError,
    collate,
    create_balanced_dataset,
    download_sms_spam,
    load_sms_spam,
    load_text_label_file,
    make_loaders,
    make_splits,
    random_split,
    read_sms_spam,
    read_text_label_file,
)

PAD = 50256
SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"


# ----------------------------------------------------------------------------- the book's numbers


def test_parse_balance_split_counts(minilora_home):
    df = read_sms_spam(minilora_home / "sms_spam" / "SMSSpamCollection")
    assert len(df) == 5572  # not 5,574 lines: pandas' quote handling merges a few, as in the book
    assert df["Label"].value_counts().to_dict() == {"ham": 4825, "spam": 747}
    balanced = create_balanced_dataset(df)
    assert len(balanced) == 1494
    assert balanced["Label"].dtype == np.int64
    assert balanced["Label"].value_counts().to_dict() == {0: 747, 1: 747}
    train, val, test = random_split(balanced, 0.7, 0.1)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)


def test_sms_splits_and_max_length(sms_data):
    assert (len(sms_data.train), len(sms_data.val), len(sms_data.test)) == (1045, 149, 300)
    assert sms_data.class_names == SMS_CLASS_NAMES == ("ham", "spam")
    assert sms_data.num_classes == 2
    assert sms_data.max_length == sms_data.train.max_length == 120
    assert sms_data.val.max_length == sms_data.test.max_length == 120
    assert sms_data.train.lengths.max() == 120
    for split in (sms_data.train, sms_data.val, sms_data.test):
        assert split.labels.dtype == np.int64 and set(split.labels.tolist()) == {0, 1}
        assert split.lengths.min() >= 1 and split.lengths.max() <= 120


def test_splits_encode_like_the_book(sms_data, gpt2_tokenizer):
    # SpamDataset: encode, truncate to max_length, pad with 50256 up to max_length.
    split = sms_data.test
    idx, labels, _ = collate(split, np.arange(len(split)))
    for row in (0, 1, 150, 299):
        ids = gpt2_tokenizer.encode(split.texts[row])[:120]
        assert idx[row].tolist() == ids + [PAD] * (120 - len(ids))
    assert labels.tolist() == split.labels.tolist()


def test_batch_counts_shapes_and_dtypes(sms_data):
    train, val, test = make_loaders(sms_data, batch_size=8)
    assert (len(train), len(val), len(test)) == (130, 19, 38)
    for loader, n_batches, last_size in ((train, 130, 8), (val, 19, 5), (test, 38, 4)):
        batches = list(loader)
        assert len(batches) == n_batches
        for idx, labels, last_index in batches:
            assert idx.shape == (len(labels), 120) and last_index.shape == labels.shape
            assert idx.dtype == labels.dtype == last_index.dtype == np.int64
        assert len(batches[-1][1]) == last_size


def test_last_index_points_at_the_last_real_token(sms_data):
    split = sms_data.val
    for pad_to in ("dataset", "longest_in_batch"):
        offset = 0
        for idx, _, last_index in BatchLoader(split, 8, pad_to=pad_to):
            rows = np.arange(len(idx))
            lengths = split.lengths[offset:offset + len(idx)]
            assert last_index.tolist() == (lengths - 1).tolist()
            last_tokens = [split.token_ids[offset + b][-1] for b in rows]
            assert idx[rows, last_index].tolist() == last_tokens
            after = np.arange(idx.shape[1]) > last_index[:, None]
            assert np.all(idx[after] == PAD) and np.all(idx[~after] != PAD)
            offset += len(idx)


def test_shuffle_is_reproducible_and_changes_per_epoch(sms_data):
    def epoch_orders(loader, epochs=2):
        return [np.concatenate([idx[:, 0] * 1000 + last for idx, _, last in loader])
                for _ in range(epochs)]

    a = BatchLoader(sms_data.train, 8, shuffle=True, drop_last=True, seed=123)
    b = BatchLoader(sms_data.train, 8, shuffle=True, drop_last=True, seed=123)
    a0, a1 = epoch_orders(a)
    b0, b1 = epoch_orders(b)
    assert np.array_equal(a0, b0) and np.array_equal(a1, b1)  # same seed, same batches
    assert not np.array_equal(a0, a1)  # a new order each epoch
    assert a.epoch == 2
    a.set_epoch(1)  # resuming at epoch 1 replays epoch 1's order
    assert np.array_equal(epoch_orders(a, 1)[0], a1)
    order = a.order(0)
    assert sorted(order.tolist()) == list(range(1045))  # a permutation: every example once
    assert not np.array_equal(order, BatchLoader(sms_data.train, 8, shuffle=True, seed=7).order(0))
    assert np.array_equal(BatchLoader(sms_data.val, 8).order(0), np.arange(149))  # no shuffle


def test_epoch_batches_resume_mid_epoch(sms_data):
    loader = BatchLoader(sms_data.train, 8, shuffle=True, drop_last=True, seed=123)
    whole = list(loader.epoch_batches(3))
    tail = list(loader.epoch_batches(3, start=100))
    assert len(whole) == 130 and len(tail) == 30
    for (a, b, c), (x, y, z) in zip(whole[100:], tail):
        assert np.array_equal(a, x) and np.array_equal(b, y) and np.array_equal(c, z)
    assert loader.epoch == 0  # replaying an epoch does not advance the loader
    loader.set_epoch(3)
    assert np.array_equal(next(iter(loader))[0], whole[0][0])


def test_labels_follow_their_texts_when_shuffled(sms_data):
    loader = BatchLoader(sms_data.train, 8, shuffle=True, drop_last=True, seed=5)
    order = loader.order(0)
    idx, labels, last_index = next(iter(loader))
    assert labels.tolist() == sms_data.train.labels[order[:8]].tolist()
    assert idx[0, :last_index[0] + 1].tolist() == sms_data.train.token_ids[order[0]]


def test_pad_to_longest_in_batch(sms_data):
    split = sms_data.train
    full = list(BatchLoader(split, 8, shuffle=True, seed=1, pad_to="dataset"))
    short = list(BatchLoader(split, 8, shuffle=True, seed=1, pad_to="longest_in_batch"))
    widths = []
    for (idx_full, y_full, last_full), (idx, y, last) in zip(full, short):
        T = idx.shape[1]
        assert T == last.max() + 1  # as long as the longest text of this batch, no longer
        assert np.array_equal(idx, idx_full[:, :T])
        assert np.all(idx_full[:, T:] == PAD)
        assert np.array_equal(y, y_full) and np.array_equal(last, last_full)
        widths.append(T)
    assert max(widths) <= 120 and np.mean(widths) < 80  # real savings on SMS lengths


def test_max_length_and_context_length(minilora_home, gpt2_tokenizer):
    path = minilora_home / "sms_spam" / "SMSSpamCollection"
    balanced = create_balanced_dataset(read_sms_spam(path))
    data = make_splits(balanced, SMS_CLASS_NAMES, gpt2_tokenizer, max_length=50)
    assert data.max_length == data.val.max_length == 50
    assert max(s.lengths.max() for s in (data.train, data.val, data.test)) == 50
    idx, _, last = collate(data.train, [0, 1, 2])
    assert idx.shape == (3, 50) and last.max() <= 49
    capped = make_splits(balanced, SMS_CLASS_NAMES, gpt2_tokenizer, context_length=64)
    assert capped.max_length == 64  # never longer than the model's position table


def test_bad_options():
    from minilora.data import Split

    split = Split("x", ["a"], np.array([0]), [[64]], max_length=1)
    with pytest.raises(ValueError, match="pad_to"):
        BatchLoader(split, pad_to="longest")
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(split, batch_size=0)
    with pytest.raises(ValueError, match="batching must be one of"):
        BatchLoader(split, batching="sorted")


# ----------------------------------------------------------------------------- batches grouped by length


def by_length_loader(sms_data, seed=123, **kwargs):
    return BatchLoader(sms_data.train, 8, shuffle=True, drop_last=True, seed=seed, pad_to="longest_in_batch",
                       batching="by_length", **kwargs)


def test_by_length_keeps_the_books_batch_count_and_every_example_once(sms_data):
    train, _, _ = make_loaders(sms_data, 8, pad_to="longest_in_batch", batching="by_length")
    book, _, _ = make_loaders(sms_data, 8)
    assert train.batching == "by_length" and len(train) == len(book) == 130
    split = sms_data.train
    for epoch in (0, 1):
        order = train.order(epoch)
        assert sorted(order.tolist()) == list(range(1045))
        # drop_last leaves out the same 5 random examples as the book's shuffled batches
        assert set(order[1040:].tolist()) == set(book.order(epoch)[1040:].tolist())
        seen = []
        for b, (idx, labels, last_index) in enumerate(train.epoch_batches(epoch)):
            rows = order[b * 8:(b + 1) * 8]
            assert idx.shape == (8, split.lengths[rows].max())  # padded to its own longest text
            assert labels.tolist() == split.labels[rows].tolist()
            assert all(idx[r, :last_index[r] + 1].tolist() == split.token_ids[i] for r, i in enumerate(rows))
            seen += rows.tolist()
        assert len(seen) == len(set(seen)) == 1040


def test_by_length_batches_carry_little_padding(sms_data):
    lengths = sms_data.train.lengths
    shuffled = BatchLoader(sms_data.train, 8, shuffle=True, drop_last=True, pad_to="longest_in_batch")
    grouped = by_length_loader(sms_data)

    def mean_padding(loader, epoch):  # pad tokens per text, averaged over the epoch's batches
        order = loader.order(epoch)[:len(loader) * 8].reshape(-1, 8)
        return float(np.mean(loader.batch_lengths(epoch)[:, None] - lengths[order]))

    for epoch in range(3):
        assert grouped.batch_lengths(epoch).mean() < 33 < 50 < shuffled.batch_lengths(epoch).mean()
        assert mean_padding(grouped, epoch) < 0.1 * mean_padding(shuffled, epoch)
    # the figures the README quotes: texts 30.4 tokens; batches 55.0 (shuffled), 31.7 (by length)
    assert round(float(lengths.mean()), 1) == 30.4
    assert round(float(np.mean([shuffled.batch_lengths(e).mean() for e in range(5)])), 1) == 55.0
    assert round(float(np.mean([grouped.batch_lengths(e).mean() for e in range(5)])), 1) == 31.7


def test_by_length_sorts_within_chunks_for_variety(sms_data, monkeypatch):
    import minilora.data as data_mod

    def figures(loader, epochs=5):  # mean padded length; share of co-batched pairs met again next epoch
        pairs = [{(i, j) for b in loader.order(e)[:1040].reshape(-1, 8) for i in b for j in b if i < j}
                 for e in range(epochs)]
        again = np.mean([len(pairs[e] & pairs[e + 1]) / len(pairs[e + 1]) for e in range(epochs - 1)])
        return np.mean([loader.batch_lengths(e).mean() for e in range(epochs)]), again

    padded, again = figures(by_length_loader(sms_data))
    monkeypatch.setattr(data_mod, "BY_LENGTH_CHUNK_BATCHES", 1000)  # one chunk: everything sorted at once
    padded_all, again_all = figures(by_length_loader(sms_data))
    assert (round(padded, 1), round(padded_all, 1)) == (31.7, 30.9)  # the order's docstring quotes these
    assert round(again, 2) == 0.15 and round(again_all, 2) == 0.29


def test_by_length_order_is_reproducible_and_changes_per_epoch(sms_data):
    a, b = by_length_loader(sms_data), by_length_loader(sms_data)
    assert np.array_equal(a.order(0), b.order(0)) and np.array_equal(a.order(4), b.order(4))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), by_length_loader(sms_data, seed=7).order(0))
    # the batch order, not only the texts within batches, is shuffled: lengths rise and fall
    longest = a.batch_lengths(0)
    assert not np.all(np.diff(longest) >= 0) and not np.all(np.diff(longest) <= 0)
    assert not np.array_equal(longest, a.batch_lengths(1))
    # iterating advances the epoch; set_epoch replays one; epoch_batches resumes mid-epoch
    first = [idx for idx, _, _ in a]
    assert a.epoch == 1 and np.array_equal(next(iter(a))[0], next(a.epoch_batches(1))[0])
    a.set_epoch(0)
    assert all(np.array_equal(x, y) for x, y in zip(first, (idx for idx, _, _ in a)))
    tail = list(a.epoch_batches(0, start=100))
    assert len(tail) == 30 and all(np.array_equal(x, y[0]) for x, y in zip(first[100:], tail))


def test_by_length_evaluation_batches(sms_data):
    _, val, test = make_loaders(sms_data, 8, pad_to="longest_in_batch", batching="by_length")
    assert (len(val), len(test)) == (19, 38)
    for loader in (val, test):
        split, order = loader.split, loader.order(0)
        assert sorted(order.tolist()) == list(range(len(split)))  # every example, none dropped
        # the same batches whatever the seed or the epoch: `minilora evaluate` rebuilds them
        assert np.array_equal(order, loader.order(3))
        assert np.array_equal(order, BatchLoader(split, 8, batching="by_length", seed=7).order(0))
        batches = [order[b * 8:(b + 1) * 8] for b in range(len(loader))]
        by_length = np.sort(split.lengths)
        spans = sorted((split.lengths[b].min(), split.lengths[b].max()) for b in batches)
        # each batch is a run of the texts sorted by length, the incomplete one the longest texts
        assert all(lo == by_length[8 * i] and hi == by_length[min(8 * i + 7, len(split) - 1)]
                   for i, (lo, hi) in enumerate(spans))
        assert split.lengths[batches[-1]].min() == by_length[(len(split) - 1) // 8 * 8]
        # the full batches are not in length order: the loop's first eval_iter batches are a sample
        firsts = [split.lengths[b].max() for b in batches[:-1]]
        assert not np.all(np.diff(firsts) >= 0)
    # why evaluation groups by length too: in the book's order, padded per batch, a text is
    # followed by ~25 pads (pool "last" reads the last of them); grouped by length by ~1, as in training
    def pads_per_text(loader):
        return float(np.mean(np.concatenate([idx.shape[1] - 1 - last for idx, _, last in loader.epoch_batches(0)])))

    in_order = BatchLoader(sms_data.val, 8, pad_to="longest_in_batch")
    assert pads_per_text(in_order) > 20 and pads_per_text(val) < 3


# ----------------------------------------------------------------------------- your own files


def write_three_class_csv(path):
    rows = ["text,label"]
    for i in range(30):
        label = ("neg", "neu", "pos")[i % 3]
        rows.append(f'"Review {i}, with a comma and ""quotes""",{label}')
    path.write_text("\n".join(rows) + "\n")
    return path


def test_custom_three_class_csv(tmp_path, gpt2_tokenizer):
    path = write_three_class_csv(tmp_path / "reviews.csv")
    df, names = read_text_label_file(path)
    assert names == ("neg", "neu", "pos")
    assert df["Text"][0] == 'Review 0, with a comma and "quotes"'
    assert df["Label"].tolist()[:4] == [0, 1, 2, 0]
    data = load_text_label_file(path, tokenizer=gpt2_tokenizer)
    assert data.num_classes == 3 and data.class_names == ("neg", "neu", "pos")
    assert (len(data.train), len(data.val), len(data.test)) == (21, 3, 6)
    assert data.source == str(path)
    train, val, test = make_loaders(data, batch_size=4)
    assert (len(train), len(val), len(test)) == (5, 1, 2)
    idx, labels, last = next(iter(train))
    assert idx.shape == (4, data.max_length) and set(labels.tolist()) <= {0, 1, 2}


def test_custom_tsv_without_header_and_numeric_labels(tmp_path):
    path = tmp_path / "data.tsv"
    labels = ["10", "2", "9"] * 4
    path.write_text("".join(f"text number {i}\t{label}\n" for i, label in enumerate(labels)))
    df, names = read_text_label_file(path)
    assert names == ("2", "9", "10")  # numeric order, not string order
    assert df["Label"].tolist()[:3] == [2, 0, 1]
    assert df["Text"][0] == "text number 0"


def test_header_in_any_order_and_case(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("Label,id,TEXT\nb,1,hello\na,2,NA\n")
    df, names = read_text_label_file(path)
    assert names == ("a", "b")
    assert df["Text"].tolist() == ["hello", "NA"]  # "NA" is a text, not a missing value
    assert df["Label"].tolist() == [1, 0]


@pytest.mark.parametrize("name, content, problem", [
    ("missing.csv", None, "does not exist"),
    ("empty.csv", "", "is empty"),
    ("header_only.csv", "text,label\n", "no rows"),
    ("ragged.csv", "text,label\nhello,a\nhi,b,extra\n", "malformed"),
    ("three_columns.csv", "a,b,c\nd,e,f\n", "found 3 columns"),
    ("empty_label.csv", "text,label\nhello,a\nhi,\n", r"empty label in row\(s\) \[3\]"),
    ("empty_text.csv", "text,label\nhello,a\n,b\n", r"empty text in row\(s\) \[3\]"),
    ("one_class.csv", "text,label\nhello,a\nhi,a\n", "at least 2 classes"),
    ("latin1.csv", "text,label\ncaf\xe9,a\nhi,b\n".encode("latin-1"), "not UTF-8"),
])
def test_malformed_files(tmp_path, name, content, problem):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=problem) as info:
        read_text_label_file(path)
    assert str(path) in str(info.value)


def test_a_folder_is_not_a_data_file(tmp_path):
    with pytest.raises(DataError, match="is not a file"):
        read_text_label_file(tmp_path)


def test_too_few_rows_to_split(tmp_path, gpt2_tokenizer):
    path = tmp_path / "tiny.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(9)))
    with pytest.raises(DataError, match="val split empty"):
        load_text_label_file(path, tokenizer=gpt2_tokenizer)


def test_not_the_sms_file(tmp_path):
    path = tmp_path / "SMSSpamCollection"
    path.write_text("good\thello\nbad\tbye\n")
    with pytest.raises(DataError, match="is not the SMS Spam Collection") as info:
        read_sms_spam(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- download + extract


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("MINILORA_OFFLINE", raising=False)


def test_download_and_extract_from_a_local_server(empty_minilora_home, online, local_http_server,
                                                  shared_data_dir, gpt2_tokenizer):
    url = local_http_server.add("/sms+spam+collection.zip", make_sms_zip(shared_data_dir))
    data = load_sms_spam(url=url, tokenizer=gpt2_tokenizer)
    assert (len(data.train), len(data.val), len(data.test)) == (1045, 149, 300)
    folder = empty_minilora_home / "sms_spam"
    assert data.source == str(folder / "SMSSpamCollection")
    assert sorted(p.name for p in folder.iterdir()) == ["SMSSpamCollection", "readme"]  # zip gone
    assert hashlib.sha256((folder / "SMSSpamCollection").read_bytes()).hexdigest() == SMS_SHA256
    # Once there, the file is used as is: no second request, also offline.
    assert download_sms_spam(url, offline=True) == folder / "SMSSpamCollection"
    assert download_sms_spam(url) == folder / "SMSSpamCollection"
    assert local_http_server.requests == ["/sms+spam+collection.zip"]


def test_zip_with_a_folder_inside(tmp_path, online, local_http_server, shared_data_dir):
    url = local_http_server.add("/sms.zip", make_sms_zip(shared_data_dir, folder_in_zip="sms/"))
    path = download_sms_spam(url, folder=tmp_path / "sms")
    assert path == tmp_path / "sms" / "SMSSpamCollection"
    assert sorted(p.name for p in path.parent.iterdir()) == ["SMSSpamCollection", "readme"]


def test_offline_without_the_file(empty_minilora_home, local_http_server, monkeypatch):
    monkeypatch.setenv("MINILORA_OFFLINE", "1")
    url = local_http_server.url("/sms+spam+collection.zip")
    with pytest.raises(DataError) as info:
        load_sms_spam(url=url)
    assert str(empty_minilora_home / "sms_spam" / "SMSSpamCollection") in str(info.value)
    assert local_http_server.requests == []


def test_download_failure_leaves_nothing(empty_minilora_home, online, local_http_server):
    with pytest.raises(DataError, match="HTTP 404") as info:
        download_sms_spam(local_http_server.url("/gone.zip"))
    assert str(empty_minilora_home / "sms_spam" / "SMSSpamCollection") in str(info.value)
    folder = empty_minilora_home / "sms_spam"
    assert not folder.exists() or list(folder.iterdir()) == []


def damage_member(zip_bytes):
    """Flip bytes in the middle of the compressed data: the directory stays readable."""
    damaged = bytearray(zip_bytes)
    middle = len(damaged) // 2
    damaged[middle:middle + 64] = bytes(b ^ 0xFF for b in damaged[middle:middle + 64])
    return bytes(damaged)


@pytest.mark.parametrize("damage", [lambda z: z[: len(z) // 2], damage_member],
                         ids=["cut_off", "bad_member"])
def test_corrupt_zip_is_deleted(tmp_path, online, local_http_server, shared_data_dir, damage):
    good = make_sms_zip(shared_data_dir)
    url = local_http_server.add("/sms.zip", damage(good))
    with pytest.raises(DataError, match="not a valid zip file"):
        download_sms_spam(url, folder=tmp_path)
    assert list(tmp_path.iterdir()) == []  # next time it downloads again
    local_http_server.add("/sms.zip", good)
    assert download_sms_spam(url, folder=tmp_path).is_file()


def test_zip_without_the_data_file(tmp_path, online, local_http_server):
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme", "nothing else")
    url = local_http_server.add("/sms.zip", buffer.getvalue())
    with pytest.raises(DataError, match="holds no SMSSpamCollection"):
        download_sms_spam(url, folder=tmp_path)
    assert list(tmp_path.iterdir()) == []
