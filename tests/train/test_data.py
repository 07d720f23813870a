"""Training data (paper §4.1 document packing): tokenizer round trips and determinism, --data inputs and their
errors, the token cache, and packed batches that cover the stream exactly and resume bit-identically."""

import json
import pathlib
import sysconfig

import numpy as np
import pytest
import tokenizers

from dsv3_jax.config import ModelConfig
from dsv3_jax.train import inputs as inputs_mod
from dsv3_jax.train import tokenizer as tokenizer_mod
from dsv3_jax.train import tokens as tokens_mod
from dsv3_jax.train.inputs import default_corpus_files, resolve_inputs
from dsv3_jax.train.packing import PackedBatches, check_seq_len
from dsv3_jax.train.tokenizer import FIM_TOKENS, ByteTokenizer, Tokenizer, train_or_load_tokenizer
from dsv3_jax.train.tokens import fim_document, prepare_tokens

CORPUS = [
    "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "class Point:\n    x: int = 0\n    y: int = 0\n\n"
    "    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n",
    "Ünïcödé — naïve café, 東京, Ελληνικά, emoji 😀🚀\n" * 5,
    "for i in range(10):\n    print(i, i * i)\n" * 10,
]
ODD_STRINGS = [
    "", " ", "\n\n\t  \r\n", "hello world", "  leading and trailing  ", "\x00\x01\x7f\x80\xff",
    "\ufeff\uffff\U0010ffff",
    "😀🚀👩‍👩‍👧", "e\u0301 combining", "東京タワー", "<|eos|> and <|bos|> as plain text", "'s 'll 're 'd",
]


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train(CORPUS, 300)


def _write(path, text):
    path = pathlib.Path(path)
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path, records):
    path = pathlib.Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ----- tokenizers -----


def test_bpe_round_trip(bpe):
    rng = np.random.default_rng(0)
    randoms = []
    for _ in range(20):
        cps = rng.integers(0, 0x110000, size=50)
        randoms.append("".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000))
    for text in ODD_STRINGS + CORPUS + randoms:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text
    assert bpe.bos_id == 0 and bpe.eos_id == 1 and bpe.vocab_size == 300
    assert 1 not in bpe.encode("<|eos|>") and 0 not in bpe.encode("<|bos|>")
    assert bpe.decode([0, *bpe.encode("x"), 1]) == "<|bos|>x<|eos|>"
    assert len(bpe.encode(CORPUS[1])) < len(CORPUS[1].encode()) / 2  # merges were learned
    assert bpe.encode_batch(CORPUS) == [bpe.encode(t) for t in CORPUS]


def test_bpe_training_is_deterministic(bpe, tmp_path):
    assert Tokenizer.train(CORPUS, 300).to_json() == bpe.to_json()
    files = [_write(tmp_path / f"{i}.txt", t) for i, t in enumerate(CORPUS)]
    assert Tokenizer.train(files, 300).to_json() == bpe.to_json()  # files read as their text
    assert Tokenizer.train(CORPUS + [" zq" * 500], 300).to_json() != bpe.to_json()


@pytest.mark.parametrize("vocab_size", [0, 263, 100])
def test_bpe_vocab_too_small(vocab_size):
    with pytest.raises(ValueError, match=f"vocab_size.*>= 264.*got {vocab_size}"):
        Tokenizer.train(CORPUS, vocab_size)


def test_save_load_and_plain_tokenizers(bpe, tmp_path):
    path = tmp_path / "ckpt" / "tokenizer.json"
    path.parent.mkdir()
    bpe.save(path)
    plain = tokenizers.Tokenizer.from_file(str(path))
    loaded = Tokenizer.load(path)
    assert type(loaded) is Tokenizer and loaded.to_json() == bpe.to_json()
    assert Tokenizer.from_json(bpe.to_json()).to_json() == bpe.to_json()
    for text in CORPUS + [s for s in ODD_STRINGS if "<|" not in s]:  # plain: "<|eos|>" is special
        ids = bpe.encode(text)
        assert plain.encode(text, add_special_tokens=False).ids == ids == loaded.encode(text)
        assert plain.decode(ids) == text
    assert plain.token_to_id("<|bos|>") == 0 and plain.token_to_id("<|eos|>") == 1


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = _write(tmp_path / "bad.json", "{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(bad)
    no_specials = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    with pytest.raises(ValueError, match="bos token at id 0"):
        Tokenizer(no_specials)


def test_byte_tokenizer(tmp_path):
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 0, 1)
    for text in ODD_STRINGS + CORPUS:
        ids = tok.encode(text)
        assert ids == [b + 2 for b in text.encode("utf-8")]
        assert ids == tok.backend.encode(text, add_special_tokens=False).ids  # the JSON form agrees
        assert tok.decode(ids) == text
    assert tok.decode([0, 2 + ord("a"), 1, 2 + 0xFF]) == "<|bos|>a<|eos|>\ufffd"
    with pytest.raises(ValueError, match="258"):
        tok.decode([258])
    tok.save(tmp_path / "tokenizer.json")
    assert isinstance(Tokenizer.load(tmp_path / "tokenizer.json"), ByteTokenizer)
    plain = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert plain.encode("héllo 😀", add_special_tokens=False).ids == tok.encode("héllo 😀")


def test_default_corpus_and_tokenizer():
    files = default_corpus_files(max_bytes=300_000)
    assert files == default_corpus_files(max_bytes=300_000)
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and all(f.suffix == ".py" for f in files)
    assert not any(set(f.relative_to(root).parts) & {"test", "tests", "site-packages", "dist-packages"}
                   for f in files)
    assert 0 < sum(f.stat().st_size for f in files) <= 300_000
    tok = Tokenizer.train(files, 512)
    assert tok.vocab_size == 512
    text = files[-1].read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode()) / 2
    with pytest.raises(ValueError, match="max_bytes"):
        default_corpus_files(0)


# ----- data inputs -----


def test_text_files_and_glob(bpe, tmp_path):
    for i, text in enumerate(CORPUS):
        _write(tmp_path / f"doc{i}.txt", text)
    tokens = prepare_tokens([str(tmp_path / "doc*.txt")], bpe, tmp_path / "cache", 300)
    expected = [t for text in CORPUS for t in bpe.encode(text) + [bpe.eos_id]]  # each document, then EOS
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and not tokens.flags.writeable
    np.testing.assert_array_equal(tokens, expected)
    two = prepare_tokens([tmp_path / "doc1.txt", tmp_path / "doc0.txt"], bpe, tmp_path / "cache", 300)
    np.testing.assert_array_equal(two, bpe.encode(CORPUS[1]) + [1] + bpe.encode(CORPUS[0]) + [1])


def test_long_text_is_chunked_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs_mod, "_READ_CHUNK_BYTES", 7)
    monkeypatch.setattr(tokens_mod, "_ENCODE_BATCH_CHARS", 50)
    text = "".join(CORPUS) + "no newline at the end 😀" * 3
    a = _write(tmp_path / "a.txt", text)
    b = _write(tmp_path / "b.txt", "x" * 100)  # no newline at all
    tokens = prepare_tokens([a, b], ByteTokenizer(), tmp_path / "cache", 258)
    expected = [c + 2 for c in text.encode()] + [1] + [ord("x") + 2] * 100 + [1]
    np.testing.assert_array_equal(tokens, expected)


def test_jsonl(bpe, tmp_path):
    docs = [{"text": t, "id": i} for i, t in enumerate(CORPUS)]
    path = _jsonl(tmp_path / "d.jsonl", docs)
    with open(path, "a") as f:
        f.write("\n   \n")  # blank lines are skipped
    tokens = prepare_tokens([path], bpe, tmp_path / "cache", 300)
    np.testing.assert_array_equal(tokens, [t for text in CORPUS for t in bpe.encode(text) + [1]])
    other = _jsonl(tmp_path / "o.jsonl", [{"content": "abc"}, {"content": "de"}])
    tokens = prepare_tokens([other], bpe, tmp_path / "cache", 300, text_key="content")
    np.testing.assert_array_equal(tokens, bpe.encode("abc") + [1] + bpe.encode("de") + [1])


# ----- fill-in-the-middle (paper §4.1) -----


def _split_fim(ids, tok):
    begin, hole, end = (tok.token_id(t) for t in FIM_TOKENS)
    assert ids[0] == begin and ids.count(begin) == ids.count(hole) == ids.count(end) == 1
    h, e = ids.index(hole), ids.index(end)
    return ids[1:h], ids[h + 1:e], ids[e + 1:]  # prefix, suffix, middle


def test_fim_document_is_prefix_suffix_middle(bpe):
    rng = np.random.default_rng(0)
    for text in CORPUS:
        pre, suf, mid = _split_fim(fim_document(text, bpe, rng), bpe)
        assert bpe.decode(pre) + bpe.decode(mid) + bpe.decode(suf) == text


def test_fim_rate_in_the_token_stream(bpe, tmp_path):
    docs = [{"text": f"doc {i}: " + CORPUS[i % len(CORPUS)]} for i in range(400)]
    path = _jsonl(tmp_path / "d.jsonl", docs)
    plain = prepare_tokens([path], bpe, tmp_path / "cache", 300)
    np.testing.assert_array_equal(plain, [t for d in docs for t in bpe.encode(d["text"]) + [1]])
    fim = prepare_tokens([path], bpe, tmp_path / "cache", 300, fim_rate=0.1, fim_seed=3)
    rows = np.split(np.asarray(fim), np.flatnonzero(np.asarray(fim) == bpe.eos_id)[:-1] + 1)
    assert len(rows) == len(docs)  # every document kept, each closed by EOS
    n_fim = 0
    for row, d in zip(rows, docs):
        ids = row[:-1].tolist()
        if ids[0] == bpe.token_id("<|fim_begin|>"):
            n_fim += 1
            pre, suf, mid = _split_fim(ids, bpe)
            assert bpe.decode(pre) + bpe.decode(mid) + bpe.decode(suf) == d["text"]
        else:
            assert ids == bpe.encode(d["text"])
    assert 20 <= n_fim <= 64  # Binomial(400, 0.1): mean 40, sd 6
    again = prepare_tokens([path], bpe, tmp_path / "cache2", 300, fim_rate=0.1, fim_seed=3)
    np.testing.assert_array_equal(again, fim)  # deterministic, cache or not
    other = prepare_tokens([path], bpe, tmp_path / "cache", 300, fim_rate=0.1, fim_seed=4)
    assert not np.array_equal(other, fim)


def test_fim_errors(tmp_path):
    path = _write(tmp_path / "a.txt", "some text")
    with pytest.raises(ValueError, match="fim-rate 0"):
        prepare_tokens([path], ByteTokenizer(), tmp_path / "cache", 258, fim_rate=0.1)
    with pytest.raises(ValueError, match="fim_rate must be in"):
        prepare_tokens([path], ByteTokenizer(), tmp_path / "cache", 258, fim_rate=1.5)


@pytest.mark.parametrize("line, match", [
    ("{not json", r"bad.jsonl:2 is not valid JSON"),
    ('{"body": "x"}', r"bad.jsonl:2 has no 'text' field"),
    ('{"text": 3}', r"bad.jsonl:2 field 'text' must be a string"),
    ('["text"]', r"bad.jsonl:2 must be a JSON object"),
])
def test_jsonl_errors(bpe, tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        prepare_tokens([path], bpe, tmp_path / "cache", 300)


def test_bin_in_place(tmp_path):
    stream = np.arange(1000, dtype=np.uint16) % 300
    path = tmp_path / "tokens.bin"
    stream.astype("<u2").tofile(path)
    tokens = prepare_tokens([path], None, tmp_path / "cache", 300)
    assert isinstance(tokens, np.memmap) and pathlib.Path(tokens.filename) == path.resolve()
    assert not tokens.flags.writeable
    np.testing.assert_array_equal(tokens, stream)
    assert not (tmp_path / "cache").exists()  # used in place, nothing copied
    wide = tmp_path / "wide.bin"
    (stream.astype(np.uint32) + 70000).astype("<u4").tofile(wide)
    tokens = prepare_tokens([wide], None, tmp_path / "cache", 80000, bin_dtype="uint32")
    assert tokens.dtype == np.uint32 and isinstance(tokens, np.memmap)
    np.testing.assert_array_equal(tokens, stream.astype(np.uint32) + 70000)


def test_npy_inputs(bpe, tmp_path, monkeypatch):
    monkeypatch.setattr(inputs_mod, "_CHECK_CHUNK_TOKENS", 64)
    monkeypatch.setattr(tokens_mod, "_COPY_CHUNK_TOKENS", 64)
    a = np.arange(500, dtype=np.uint16) % 300
    np.save(tmp_path / "a.npy", a)
    tokens = prepare_tokens([tmp_path / "a.npy"], None, tmp_path / "cache", 300)
    assert isinstance(tokens, np.memmap) and pathlib.Path(tokens.filename) == (tmp_path / "a.npy").resolve()
    np.testing.assert_array_equal(tokens, a)
    b = (np.arange(300, dtype=np.int32) * 7) % 300
    np.save(tmp_path / "b.npy", b)
    single = prepare_tokens([tmp_path / "b.npy"], None, tmp_path / "cache", 300)  # int32 -> copied as uint16
    assert isinstance(single, np.memmap) and single.dtype == np.uint16
    np.testing.assert_array_equal(single, b)
    _write(tmp_path / "t.txt", "hello")
    mixed = prepare_tokens([tmp_path / "a.npy", tmp_path / "t.txt", tmp_path / "b.npy"], bpe, tmp_path / "cache", 300)
    np.testing.assert_array_equal(mixed, np.concatenate([a, bpe.encode("hello") + [1], b]))
    np.save(tmp_path / "c.npy", np.zeros((2, 3), np.uint16))
    with pytest.raises(ValueError, match="c.npy must hold a 1-D array"):
        prepare_tokens([tmp_path / "c.npy"], None, tmp_path / "cache", 300)
    np.save(tmp_path / "f.npy", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="f.npy has dtype"):
        prepare_tokens([tmp_path / "f.npy"], None, tmp_path / "cache", 300)


@pytest.mark.parametrize("suffix", [".bin", ".npy"])
def test_token_id_too_large(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(inputs_mod, "_CHECK_CHUNK_TOKENS", 100)  # the bad id sits in a later chunk
    stream = np.zeros(1000, np.uint16)
    stream[777] = 4321
    path = tmp_path / f"tok{suffix}"
    stream.tofile(path) if suffix == ".bin" else np.save(path, stream)
    with pytest.raises(ValueError, match=rf"tok\{suffix} holds token id 4321 .*>= the model's vocab_size 4000"):
        prepare_tokens([path], None, tmp_path / "cache", 4000)
    np.save(tmp_path / "neg.npy", np.array([3, -1, 2], np.int32))
    with pytest.raises(ValueError, match="neg.npy holds a negative token id -1"):
        prepare_tokens([tmp_path / "neg.npy"], None, tmp_path / "cache", 4000)


def test_input_errors(bpe, tmp_path):
    cache = tmp_path / "cache"
    for name in ("empty.txt", "empty.jsonl", "empty.bin", "empty.npy"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            prepare_tokens([tmp_path / name], bpe, cache, 300)
    _write(tmp_path / "blank.jsonl", "\n\n")
    with pytest.raises(ValueError, match="blank.jsonl holds no text"):
        prepare_tokens([tmp_path / "blank.jsonl"], bpe, cache, 300)
    np.save(tmp_path / "none.npy", np.zeros(0, np.uint16))
    with pytest.raises(ValueError, match="none.npy holds no tokens"):
        prepare_tokens([tmp_path / "none.npy"], bpe, cache, 300)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match="odd.bin has 3 bytes"):
        prepare_tokens([tmp_path / "odd.bin"], bpe, cache, 300)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare_tokens([tmp_path / "missing.txt"], bpe, cache, 300)
    with pytest.raises(FileNotFoundError, match=r"glob .*nothing-\*\.txt.* matches no files"):
        prepare_tokens([str(tmp_path / "nothing-*.txt")], bpe, cache, 300)
    (tmp_path / "latin1.txt").write_bytes("ok line\ncafé\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 .*offset 11"):
        prepare_tokens([tmp_path / "latin1.txt"], bpe, cache, 300)
    with pytest.raises(ValueError, match="is a directory"):
        prepare_tokens([tmp_path], bpe, cache, 300)
    _write(tmp_path / "ok.txt", "fine")
    with pytest.raises(ValueError, match="tokenizer vocab_size 300 exceeds the model's vocab_size 299"):
        prepare_tokens([tmp_path / "ok.txt"], bpe, cache, 299)
    with pytest.raises(ValueError, match="bin_dtype"):
        resolve_inputs([tmp_path / "ok.txt"], bin_dtype="int8")
    assert not list(cache.glob("*.tmp"))  # failed writes leave no temp files behind


def test_cache_is_reused_and_invalidated(bpe, tmp_path, monkeypatch):
    src = _write(tmp_path / "a.txt", CORPUS[0])
    first = prepare_tokens([src], bpe, tmp_path / "cache", 300)
    bins = list((tmp_path / "cache").glob("tokens-*.bin"))
    meta = json.loads(next((tmp_path / "cache").glob("tokens-*.json")).read_text())
    assert len(bins) == 1 and meta["count"] == first.size and meta["dtype"] == "uint16"

    def no_encoding(texts):
        raise AssertionError("a cached corpus must not be tokenized again")

    monkeypatch.setattr(bpe, "encode_batch", no_encoding)
    second = prepare_tokens([src], bpe, tmp_path / "cache", 300)
    assert second.filename == first.filename
    np.testing.assert_array_equal(second, first)
    monkeypatch.undo()
    _write(src, CORPUS[0] + "# edited\n")  # a changed input is tokenized afresh
    third = prepare_tokens([src], bpe, tmp_path / "cache", 300)
    assert third.filename != first.filename and third.size > first.size
    wide = prepare_tokens([src], bpe, tmp_path / "cache", 100_000)
    assert wide.dtype == np.uint32
    np.testing.assert_array_equal(wide, third)


def test_train_or_load_tokenizer(tmp_path, monkeypatch):
    files = [_write(tmp_path / f"{i}.txt", t) for i, t in enumerate(CORPUS)]
    tok = train_or_load_tokenizer(files, 300, tmp_path / "cache")
    assert tok.to_json() == Tokenizer.train(files, 300).to_json()
    monkeypatch.setattr(tokenizer_mod, "_train_bpe", lambda *a: pytest.fail("cached tokenizer retrained"))
    assert train_or_load_tokenizer(files, 300, tmp_path / "cache").to_json() == tok.to_json()


# ----- packed batches -----


def _stream(n=1000, seed=0):
    return np.random.default_rng(seed).integers(0, 300, size=n).astype(np.uint16)


def test_windows_cover_the_stream():
    tokens = _stream(1003)
    packed = PackedBatches(tokens, seq_len=9, seed=0)
    assert packed.num_sequences == 100
    joined = np.concatenate([packed.sequence(i) for i in range(packed.num_sequences)])
    np.testing.assert_array_equal(joined, tokens[:1000])
    batch, pos = packed.batch(0, packed.num_sequences)  # one epoch visits every window once
    assert batch.dtype == np.int32 and batch.shape == (100, 10) and pos == 100
    order = [next(i for i in range(100) if np.array_equal(row, packed.sequence(i))) for row in batch]
    assert sorted(order) == list(range(100)) and order != list(range(100))
    np.testing.assert_array_equal(order, np.random.default_rng((0, 0)).permutation(100))


def test_resumption_across_epochs():
    packed = PackedBatches(_stream(), seq_len=15, seed=3)  # 62 windows per epoch
    batches, pos = [], 0
    for _ in range(30):  # ~2.4 epochs of batch 5; several batches straddle an epoch boundary
        b, pos = packed.batch(pos, 5)
        batches.append(b)
    assert pos == 150
    resumed = PackedBatches(_stream(), seq_len=15, seed=3)  # a fresh process: no cached permutations
    p = 60  # batch 12 spans windows 60..64: the end of epoch 0 and the start of epoch 1
    for k in range(p // 5, 30):
        b, p = resumed.batch(p, 5)
        np.testing.assert_array_equal(b, batches[k])
    epoch1 = np.concatenate(batches)[62:124]
    assert sorted(tuple(r) for r in epoch1) == sorted(tuple(resumed.sequence(i)) for i in range(62))
    odd, _ = resumed.batch(61, 3)  # any position, not only multiples of the batch size
    np.testing.assert_array_equal(odd, np.concatenate(batches)[61:64])


def test_seeds_change_the_order():
    a, _ = PackedBatches(_stream(), 15, seed=0).batch(0, 20)
    b, _ = PackedBatches(_stream(), 15, seed=1).batch(0, 20)
    c, _ = PackedBatches(_stream(), 15, seed=0).batch(0, 20)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_packed_errors():
    with pytest.raises(ValueError, match="has 10 tokens; one sequence of seq_len=10 needs 11"):
        PackedBatches(_stream(10), seq_len=10, seed=0)
    PackedBatches(_stream(11), seq_len=10, seed=0)
    packed = PackedBatches(_stream(), 15, seed=0)
    for position, batch_size in ((-1, 2), (0, 0)):
        with pytest.raises(ValueError):
            packed.batch(position, batch_size)


def test_check_seq_len():
    cfg = ModelConfig(max_position_embeddings=64)
    check_seq_len(64, cfg)  # the model sees 64 positions; the 65th window token is only a target
    with pytest.raises(ValueError, match="seq_len 65 exceeds ModelConfig.max_position_embeddings 64"):
        check_seq_len(65, cfg)
    with pytest.raises(ValueError, match="seq_len"):
        check_seq_len(0, cfg)

