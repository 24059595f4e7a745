"""Text is read and tokenised in bounded memory (issue 25): a file or corpus above
--max-data-bytes is refused naming the file, its size and the limit; a device or pipe with no
size is read only up to the limit; tokenising in chunks gives exactly the tokens of the whole
text."""

from __future__ import annotations

import os
import random
import resource
import subprocess
import sys
import threading

import numpy as np
import pytest

from fastlm.train import data
from fastlm.train.commands import train_main
from fastlm.train.tokenizer import BPETokenizer, ByteTokenizer


def _whole_file_tokens(docs, tokenizer) -> tuple[np.ndarray, int]:
    """The tokens as tokenize() made them before chunking: each document encoded whole."""
    texts = [text for _, text in docs]
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.int32
    pieces = []
    for ids in tokenizer.encode_many(texts):
        pieces += [ids.astype(dtype), np.array([tokenizer.eos_id], dtype=dtype)]
    return np.concatenate(pieces), sum(len(t.encode("utf-8")) for t in texts)


# Words cut anywhere, runs of spaces, tabs, CRLF, blank lines, trailing blanks, digits,
# punctuation, contractions, multi-byte characters (2, 3 and 4 bytes), special-token strings.
TRICKY = ("def f(x):\r\n    return x  \t\n\n\n   it's 12345 + 6.7e-8 == ok?!\n"
          "caf\u00e9 na\u00efve \u4e2d\u6587\u5b57 \U0001f600\U0001f680 \u00e9\u00e9\u00e9\u00e9 <mask> a<pad>b "
          "<extra_id_3>   \n\t\t  x\u3000y\u00a0z  end \n" * 3)


@pytest.fixture(scope="module")
def bpe():
    docs, _ = data.read_documents(None)
    sample = [text for _, text in docs[::40]] + [TRICKY]
    return BPETokenizer.train(sample, 600)


def test_text_chunks_join_back_cut_only_before_whitespace_and_stay_near_the_size():
    for size in range(1, 60):
        chunks = list(data.text_chunks(TRICKY, size))
        assert "".join(chunks) == TRICKY
        for chunk in chunks[1:]:  # each cut: before a space or newline that follows non-whitespace
            assert chunk[0] in " \n", (size, chunk)
        for before, after in zip(chunks, chunks[1:]):
            assert not before[-1].isspace()
    chunks = list(data.text_chunks(TRICKY, 64))
    assert len(chunks) >= len(TRICKY) // 64 and max(map(len, chunks)) <= 64
    assert list(data.text_chunks("no-whitespace-at-all" * 10, 8)) == ["no-whitespace-at-all" * 10]
    assert list(data.text_chunks("", 8)) == [""]


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_chunked_tokens_equal_whole_document_tokens_for_every_chunk_size(kind, bpe):
    tok = ByteTokenizer() if kind == "byte" else bpe
    docs = [("a", TRICKY), ("b", "x"), ("c", TRICKY[7:] + "tail")]
    expected, n_bytes = _whole_file_tokens(docs, tok)
    for size in list(range(1, 40)) + [97, 1000]:  # boundaries inside words and multi-byte characters
        stream = data.tokenize(docs, tok, chunk_chars=size)
        assert stream.tokens.dtype == expected.dtype
        np.testing.assert_array_equal(stream.tokens, expected, err_msg=f"chunk size {size}")
        assert (stream.n_bytes, stream.n_documents) == (n_bytes, 3)


def test_chunked_tokens_equal_whole_document_tokens_on_the_builtin_corpus(bpe):
    docs, _ = data.read_documents(None)
    byte = ByteTokenizer()
    expected, n_bytes = _whole_file_tokens(docs, byte)
    stream = data.tokenize(docs, byte, chunk_chars=4096)
    np.testing.assert_array_equal(stream.tokens, expected)
    assert stream.n_bytes == n_bytes
    part = docs[::6]  # BPE on a sixth of it (the whole takes long on 2 cores)
    expected, n_bytes = _whole_file_tokens(part, bpe)
    stream = data.tokenize(part, bpe, chunk_chars=2048)
    np.testing.assert_array_equal(stream.tokens, expected)
    assert stream.n_bytes == n_bytes


def test_the_tokenizer_sees_a_chunk_at_a_time(monkeypatch):
    """The int64 ids alive at once are a chunk's, not the whole corpus's."""
    tok = ByteTokenizer()
    seen = []
    real = tok.encode_many
    monkeypatch.setattr(tok, "encode_many", lambda texts: seen.append(sum(map(len, texts))) or real(texts))
    text = " ".join(f"word{i}" for i in range(20000))  # 128 KB
    data.tokenize([("a", text), ("b", text)], tok, chunk_chars=4096)
    assert len(seen) > 60 and max(seen) <= 4096, (len(seen), max(seen))


@pytest.mark.parametrize("block", [1, 2, 3, 5, 7, 4096])
def test_reading_in_blocks_gives_the_whole_files_text(block, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "READ_BLOCK", block)
    monkeypatch.setattr(data, "SNIFF_BYTES", 3)  # the first read ends inside a character too
    good = tmp_path / "good.txt"
    good.write_bytes(TRICKY.encode("utf-8"))
    assert data._read_text(str(good), strict=True) == (TRICKY, len(TRICKY.encode("utf-8")))
    assert data._read_text(str(good), strict=False)[0] == TRICKY
    rng = random.Random(block)
    raw = TRICKY.encode("utf-8") + bytes(rng.randrange(1, 256) for _ in range(300)) + "\u00e9".encode()[:1]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(raw)
    assert data._read_text(str(bad), strict=True)[0] == raw.decode("utf-8", errors="replace")  # a named file
    assert data._read_text(str(bad), strict=False)[0] is None  # in a folder: skipped


def test_a_file_above_the_limit_is_refused_from_its_size_before_any_run_dir(tmp_path, capsys):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:  # sparse: 3 GiB of size, nothing on the disk
        f.truncate(3 << 30)
    out = str(tmp_path / "run")
    assert train_main(["--data", str(big), "--out", out, "--no-progress"]) == 2  # the default limit, 1 GiB
    err = capsys.readouterr().err
    assert f"--data {big}: 3.0 GiB (3221225472 bytes)" in err
    assert "over the limit of 1.0 GiB (1073741824 bytes) (--max-data-bytes" in err
    assert "Traceback" not in err and not os.path.exists(out)
    small = tmp_path / "small.txt"
    small.write_text("hello world\n" * 200)  # 2400 bytes
    assert train_main(["--data", str(small), "--out", out, "--max-data-bytes", "2K"]) == 2
    assert "2.3 KiB (2400 bytes), over the limit of 2.0 KiB (2048 bytes)" in capsys.readouterr().err
    assert not os.path.exists(out)
    with pytest.raises(data.DataError, match="brings the named files to 4.7 KiB"):  # together
        data.check_paths([str(small), str(small)], 4096)


def test_a_folder_is_held_to_the_limit_as_it_is_read_and_binaries_do_not_count(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha beta\n" * 200)  # 2200 bytes
    (folder / "b.txt").write_text("gamma delta\n" * 200)  # 2400 bytes
    (folder / "image.bin").write_bytes(b"\x89PNG\0" + os.urandom(100_000))
    os.symlink("/dev/zero", folder / "zero.txt")  # a device in a folder: skipped (name it to read it)
    os.mkfifo(folder / "pipe.txt")  # no writer: opening it would wait forever
    os.symlink(folder / "gone", folder / "dangling.txt")
    docs, _ = data.read_documents([str(folder)], max_bytes=4600)
    assert [name for name, _ in docs] == ["texts/a.txt", "texts/b.txt"]
    with pytest.raises(data.DataError) as e:
        data.read_documents([str(folder)], max_bytes=4000)
    msg = str(e.value)
    assert "b.txt: 2.3 KiB (2400 bytes) after 2.1 KiB (2200 bytes) of other files" in msg, msg
    assert "over the limit of 3.9 KiB (4000 bytes)" in msg
    with pytest.raises(data.DataError, match="built-in corpus: .* over the limit of 1.0 MiB"):
        data.read_documents(None, max_bytes=1 << 20)


def test_a_pipe_is_read_only_up_to_the_limit(tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    written = [0]

    def writer():  # endless text until the reader hangs up
        line = b"the same line of text, again and again\n" * 100
        try:
            with open(fifo, "wb") as f:
                while True:
                    f.write(line)
                    written[0] += len(line)
        except (BrokenPipeError, OSError):
            pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    with pytest.raises(data.DataError, match=f"--data {fifo}: a pipe with no size: more than 1.0 MiB .* read"):
        data.read_documents([fifo], max_bytes=1 << 20)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert written[0] < (1 << 20) + (4 << 20)  # the limit, a block and the pipe's buffer; then it stopped


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_dev_zero_and_an_endless_pipe_are_refused_quickly_in_bounded_memory(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "fastlm", "train", "--data", "/dev/zero", "--out", out,
                           "--no-progress"], capture_output=True, text=True, timeout=240, env=env,
                          preexec_fn=_limit_memory)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fastlm train: error: --data /dev/zero: not a text file" in proc.stderr
    assert "Traceback" not in proc.stderr
    yes = subprocess.Popen(["yes", "an endless line of text"], stdout=subprocess.PIPE)
    try:
        proc = subprocess.run([sys.executable, "-m", "fastlm", "train", "--data", "/dev/stdin", "--out", out,
                               "--no-progress", "--max-data-bytes", "64M"], stdin=yes.stdout, capture_output=True,
                              text=True, timeout=240, env=env, preexec_fn=_limit_memory)
    finally:
        yes.stdout.close()
        yes.kill()
        yes.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--data /dev/stdin: a pipe with no size: more than 64.0 MiB (67108864 bytes) read" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 2 << 20  # KiB: under 2 GiB
