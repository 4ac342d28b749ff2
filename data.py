"""Text in, batches of token windows out: tokenizers, datasets, a token cache, the batch stream.

  tokenizer  'byte': the UTF-8 bytes, 256 ids. 'gpt2': GPT-2's BPE, built offline by tiktoken
             from the vendored gpt2.tiktoken.
  --data     'stdlib': this Python's standard library .py files (~12 MB every machine has).
             'shakespeare': Tiny Shakespeare, downloaded once (the only network access). A text
             file, a folder, a glob; or a folder holding nanoGPT's train.bin/val.bin.

Text is tokenized once into uint16 train.bin/val.bin under the cache folder, then memory-mapped.
Batches are a pure function of (seed, cursor), so a checkpoint only has to save the cursor.

Needs: checkpoint.py (atomic_write: a kill never leaves half a cache file).
"""
import base64
import glob
import hashlib
import os
import sysconfig
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from checkpoint import atomic_write


class DataError(ValueError):  # a problem with the user's data, reported as one line
    pass


# --- tokenizers --------------------------------------------------------------------------------
class ByteTokenizer:
    vocab_size = 256
    eot = 0  # NUL never occurs in text, so it can mark the end of a document
    token_bytes = np.minimum(np.arange(256), 1)  # bytes of text each id stands for (eot: 0)

    def encode(self, text):
        return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.uint16)

    def to_bytes(self, ids):  # the text's bytes, eot written out
        return b''.join(b'<|endoftext|>' if i == self.eot else bytes([i]) for i in map(int, ids))

    def decode(self, ids):  # as GPT2Tokenizer's
        return self.to_bytes(ids).decode('utf-8', errors='replace')


# tiktoken's own sha256 for these ranks (its r50k_base; the 'gpt2' encoding has the same ranks)
GPT2_SHA256 = '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930'


class GPT2Tokenizer:
    vocab_size = 50257
    eot = 50256  # <|endoftext|>

    def __init__(self, path=Path(__file__).with_name('gpt2.tiktoken')):
        import tiktoken
        from tiktoken_ext.openai_public import r50k_pat_str  # the pre-split regex; reads no file
        raw = Path(path).read_bytes()
        if hashlib.sha256(raw).hexdigest() != GPT2_SHA256:
            raise DataError(f"{path} is not GPT-2's BPE ranks (sha256 mismatch): "
                            "restore it with git checkout")
        lines = [line.split() for line in raw.splitlines() if line]
        ranks = {base64.b64decode(token): int(rank) for token, rank in lines}
        self.enc = tiktoken.Encoding('gpt2', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                     special_tokens={'<|endoftext|>': self.eot})
        # bytes of text each id stands for (eot: 0)
        self.token_bytes = np.array([len(t) for t in sorted(ranks, key=ranks.get)] + [0])

    def encode(self, text):
        return np.array(self.enc.encode_ordinary(text), np.uint16)  # 50257 ids fit in uint16

    def to_bytes(self, ids):  # the text's bytes, eot written out
        return self.enc.decode_bytes([int(i) for i in ids])

    def decode(self, ids):
        return self.to_bytes(ids).decode('utf-8', errors='replace')


def get_tokenizer(name):
    if name not in ('byte', 'gpt2'):
        raise DataError(f"--tokenizer={name!r} is unknown: use byte or gpt2")
    return ByteTokenizer() if name == 'byte' else GPT2Tokenizer()


# --- datasets: a list of (name, text) documents, split into train and val ----------------------
SHAKESPEARE_URL = ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/'
                   'tinyshakespeare/input.txt')
SHAKESPEARE_SHA256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'


def source_files(data, cache_dir):  # --data -> (root, files), or a DataError with the fix
    if data == 'stdlib':  # its .py files, without test suites or installed packages
        root = Path(sysconfig.get_paths()['stdlib'])
        skip = {'test', 'tests', 'idle_test', 'site-packages', 'dist-packages'}
        return root, sorted(p for p in root.rglob('*.py')
                            if not skip & set(p.relative_to(root).parts[:-1]))
    path = Path(cache_dir) / 'shakespeare.txt' if data == 'shakespeare' else Path(data)
    if data == 'shakespeare' and not path.exists():
        download(SHAKESPEARE_URL, path, SHAKESPEARE_SHA256)
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():  # every file, but those under a hidden name (.git/, .venv/ ...), the cache
        cache = Path(cache_dir).resolve()  # and a run's out_dir (its lock marks it): both grow

        def skipped(p):
            hidden = any(part.startswith('.') for part in p.relative_to(path).parts)
            return hidden or (p.parent / 'lock').exists() or cache in p.resolve().parents
        return path, sorted(p for p in path.rglob('*') if p.is_file() and not skipped(p))
    files = sorted(Path(p) for p in glob.glob(data, recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"--data={data!r}: no regular file, folder or glob match of that name: "
                        "check the path")
    return Path(os.path.commonpath([p.parent for p in files])), files


def download(url, path, sha256):
    print(f"downloading {url} (once) ...")
    try:
        raw = urllib.request.urlopen(url, timeout=30).read()
    except OSError as e:
        raise DataError(f"cannot download {url} ({getattr(e, 'reason', e)}): connect to the "
                        "network, or save the file yourself and pass --data=path/to/file") from None
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise DataError(f"{url} gave a file whose sha256 is not {sha256}: nothing was saved; "
                        "try again later")
    atomic_write(path, lambda f: f.write(raw))


def split_documents(root, files):
    """(train, val) lists of texts. Many files: about 1 in 10 goes to val, chosen by a hash of its
    name so the choice never changes. One file: its last 10% (by characters) is val, as nanoGPT."""
    texts, skipped = [], []
    for p in files:
        raw = p.read_bytes()
        try:  # text is UTF-8 without NUL bytes; anything else (.pyc, .npz, images) is skipped
            text = raw.decode('utf-8')
        except UnicodeDecodeError:
            text = None
        if text is None or '\0' in text:
            skipped.append(p)
        else:
            texts.append((str(p.relative_to(root)), text))
    if skipped:
        print(f"skipped {len(skipped)} of {len(files)} files that are not UTF-8 text, "
              f"e.g. {skipped[0]}")
    texts = [(name, t) for name, t in texts if t]
    if not texts:
        raise DataError("the dataset is empty (no file of UTF-8 text without NUL bytes): point "
                        "--data at files that hold text")
    if len(texts) == 1:
        text, cut = texts[0][1], int(len(texts[0][1]) * 0.9)
        return [text[:cut]], [text[cut:]]
    # the first file always trains, and the last validates if no other does: never an empty side
    is_val = [i > 0 and zlib.crc32(os.fsencode(name)) % 10 == 0
              for i, (name, _) in enumerate(texts)]
    is_val[-1] = is_val[-1] or not any(is_val)
    train = [text for (_, text), val in zip(texts, is_val) if not val]
    val = [text for (_, text), val in zip(texts, is_val) if val]
    return train, val


# --- the token cache -----------------------------------------------------------------------------
def load_tokens(data, tokenizer, cache_dir):
    """--data -> (train, val) uint16 token arrays (np.memmap), tokenizing on first use only."""
    if not data:  # Path('') is the current folder: never read that by accident
        raise DataError("--data is empty: pass stdlib, shakespeare, or a file, folder or glob")
    path = Path(data)
    try:
        if (path / 'train.bin').is_file() and (path / 'val.bin').is_file():  # nanoGPT's prepare.py
            return [read_bin(path / f'{split}.bin') for split in ('train', 'val')]
        root, files = source_files(data, cache_dir)
        # the cache is keyed by the tokenizer and a hash of every file's name and contents
        # (reading them costs far less than tokenizing): any edit makes a new cache, whatever
        # the file's mtime
        digest = hashlib.sha256(tokenizer.encode())
        for p in files:
            name, contents = os.fsencode(p.relative_to(root)), p.read_bytes()  # any name's bytes
            digest.update(name + b'\0' + hashlib.sha256(contents).digest())
    except OSError as e:
        raise DataError(f"--data={data[:200]!r} cannot be read ({e.strerror}): check the "
                        "path") from None
    folder = Path(cache_dir) / f"{path.name or 'data'}-{tokenizer}-{digest.hexdigest()[:12]}"
    try:
        if not (folder / 'val.bin').exists():
            tok = get_tokenizer(tokenizer)
            for split, docs in zip(('train', 'val'), split_documents(root, files)):
                # documents are joined with <|endoftext|>, as GPT-2 was trained
                ids = np.concatenate([np.append(tok.encode(d), np.uint16(tok.eot)) for d in docs])
                atomic_write(folder / f'{split}.bin', ids.tofile)  # val last: it marks done
            print(f"tokenized {len(files)} files of {data} into {folder}")
    except OSError as e:
        raise DataError(f"--cache_dir={cache_dir} cannot hold the tokens ({e.strerror or e}): free "
                        "some space or pass another --cache_dir") from None
    try:
        return [read_bin(folder / f'{split}.bin') for split in ('train', 'val')]
    except OSError as e:  # a file of it deleted, or replaced by a folder
        raise DataError(f"{folder} is damaged ({e.strerror}): delete it to tokenize "
                        "again") from None


def read_bin(path):  # a train.bin or val.bin of uint16 token ids, memory-mapped
    size = path.stat().st_size
    if size == 0 or size % 2:
        what = 'empty' if size == 0 else f'{size:,} bytes long, an odd length'
        raise DataError(f"{path} is {what}, so it is not uint16 token ids: write it again "
                        "(nanoGPT's prepare.py), or delete a cache folder to tokenize again")
    return np.memmap(path, np.uint16, 'r')


# --- the batch stream ----------------------------------------------------------------------------
class Batches:
    """Global batches of (batch_size, T+1) windows; inputs are [:, :-1], targets [:, 1:].

    Each epoch cuts the tokens into non-overlapping windows of T+1 on a grid shifted by a random
    offset, and visits each window once in a random order, both seeded by (seed, epoch): on small
    data a new grid each epoch shows new windows, as nanoGPT's random offsets do. The cursor counts
    windows handed out, so a run resumes at the same window. Row i of a batch goes to data shard
    i // (batch_size / data): each shard its own contiguous slice, never the same window."""

    def __init__(self, tokens, block_size, batch_size, seed, split='train'):
        self.tokens, self.T, self.B, self.seed = tokens, block_size, batch_size, seed
        self.n = (len(tokens) - block_size) // (block_size + 1)  # windows per epoch, any offset
        if self.n < batch_size:
            raise DataError(f"the {split} split has {len(tokens):,} tokens, fewer than one batch "
                            f"of {batch_size} x {block_size + 1} (and a shift): use more data or a "
                            "smaller --batch_size or --block_size")
        # the last epoch used: its number, the order of its windows, the shift of its grid
        self.epoch, self.order, self.shift = -1, None, 0

    def window_starts(self, cursor):
        idx = cursor + np.arange(self.B)
        starts = np.empty(self.B, np.int64)
        for epoch in np.unique(idx // self.n):  # at most two: a batch may straddle an epoch end
            if self.epoch != epoch:
                rng = np.random.default_rng((self.seed, int(epoch)))
                self.epoch, self.order = epoch, rng.permutation(self.n)
                self.shift = int(rng.integers(self.T + 1))
            here = idx // self.n == epoch
            starts[here] = self.shift + self.order[idx[here] % self.n] * (self.T + 1)
        return starts

    def get(self, cursor, rows=slice(None)):  # -> (B, T+1) int32 (those rows), the next cursor
        batch = np.stack([self.tokens[s:s + self.T + 1] for s in self.window_starts(cursor)[rows]])
        return batch.astype(np.int32), cursor + self.B
