"""Text in, batches of token windows out: tokenizers, datasets, a token cache, the batch stream.

  tokenizer   'byte': the UTF-8 bytes, 256 ids, no file needed.
              'gpt2': GPT-2's BPE through tiktoken, built offline from the vendored gpt2.tiktoken.
  --data      'stdlib' (default): the running Python's standard library .py files, ~12 MB every machine has.
              'shakespeare': Tiny Shakespeare, downloaded once (the only network access).
              a text file, a folder, or a glob; or a folder holding nanoGPT's train.bin/val.bin.

Text is tokenized once into uint16 train.bin/val.bin under the cache folder, then memory-mapped.
Batches are a pure function of (seed, cursor), so a checkpoint only has to save the cursor.

Needs: nothing from the other files.
"""
import base64
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import sys
import sysconfig
import urllib.request
import zlib
from pathlib import Path

import numpy as np

class DataError(ValueError):
    """A problem with the user's data, reported as one line."""

# --- flags: the command line is input too --------------------------------------------------
def parse_flags(argv, cfg, presets):
    """--name=value for every field of the dataclass `cfg`; --flag alone means --flag=True."""
    names, prog = {f.name: f for f in dataclasses.fields(cfg)}, os.path.basename(sys.argv[0])
    if '-h' in argv or '--help' in argv:
        print(f"usage: python {prog} [--name=value ...]\n")
        for f in names.values():
            print(f"  --{f.name}={getattr(cfg, f.name)!r}  ({f.type.__name__})")
        if presets:
            print(f"\npresets (--preset=NAME, then your flags on top): {', '.join(presets)}")
        sys.exit(0)
    pairs = []
    for arg in argv:
        name, eq, value = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or name not in names:
            sys.exit(f"{prog}: unknown flag {arg!r}: see --help for the flags")
        pairs.append((name, value if eq else 'True'))
    preset = dict(pairs).get('preset')
    if preset is not None and preset not in presets:
        sys.exit(f"{prog}: unknown preset {preset!r}: choose one of {', '.join(presets)}")
    pairs = list(presets.get(preset, {}).items()) + pairs  # the preset's values, then the flags on top
    for name, value in pairs:
        kind = names[name].type
        try:
            if kind is bool:  # bool('False') is True: read the word
                value = {'true': True, 'false': False, '1': True, '0': False}[str(value).lower()]
            setattr(cfg, name, kind(value))
        except (ValueError, KeyError):
            sys.exit(f"{prog}: --{name}={value!r} is not a valid {kind.__name__}")
    return cfg

# --- tokenizers --------------------------------------------------------------------------------
class ByteTokenizer:
    vocab_size = 256
    eot = 0  # NUL never occurs in text, so it can mark the end of a document
    token_bytes = np.minimum(np.arange(256), 1)  # bytes of text each id stands for: 1, but 0 for eot

    def encode(self, text):
        return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.uint16)

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode('utf-8', errors='replace').replace('\0', '<|endoftext|>')

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
            raise DataError(f"{path} is not GPT-2's BPE ranks (sha256 mismatch): restore it with git checkout")
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in raw.splitlines() if line)}
        self.enc = tiktoken.Encoding('gpt2', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                     special_tokens={'<|endoftext|>': self.eot})
        self.token_bytes = np.array([len(t) for t in sorted(ranks, key=ranks.get)] + [0])  # eot: 0 bytes

    def encode(self, text):
        return np.array(self.enc.encode_ordinary(text), np.uint16)  # 50257 ids fit in uint16

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

def get_tokenizer(name):
    if name not in ('byte', 'gpt2'):
        raise DataError(f"--tokenizer={name!r} is unknown: use byte or gpt2")
    return ByteTokenizer() if name == 'byte' else GPT2Tokenizer()

# --- datasets: a list of (name, text) documents, split into train and val ----------------------
SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
SHAKESPEARE_SHA256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'

def source_files(data, cache_dir):
    """--data -> (root, files). Raises DataError with the fix when there is nothing to read."""
    if data == 'stdlib':  # its .py files, without test suites or installed packages
        root = Path(sysconfig.get_paths()['stdlib'])
        skip = {'test', 'tests', 'idle_test', 'site-packages', 'dist-packages'}
        return root, sorted(p for p in root.rglob('*.py') if not skip & set(p.relative_to(root).parts[:-1]))
    path = Path(cache_dir) / 'shakespeare.txt' if data == 'shakespeare' else Path(data)
    if data == 'shakespeare' and not path.exists():
        download(SHAKESPEARE_URL, path, SHAKESPEARE_SHA256)
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():  # every file, but those under a hidden name (.git/, .venv/ ...)
        return path, sorted(p for p in path.rglob('*') if p.is_file()
                            and not any(part.startswith('.') for part in p.relative_to(path).parts))
    files = sorted(Path(p) for p in glob.glob(data, recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"--data={data!r}: no such file, folder or glob match: check the path")
    return Path(os.path.commonpath([p.parent for p in files])), files

def download(url, path, sha256):
    print(f"downloading {url} (once) ...")
    try:
        raw = urllib.request.urlopen(url, timeout=30).read()
    except OSError as e:
        raise DataError(f"cannot download {url} ({getattr(e, 'reason', e)}): connect to the network, "
                        f"or save the file yourself and pass --data=path/to/file") from None
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise DataError(f"{url} gave a file whose sha256 is not {sha256}: nothing was saved; try again later")
    atomic_write(path, lambda f: f.write(raw))

def atomic_write(path, write):
    """Call write(f) on a temporary file, flush it to disk, then rename it to path: a kill at any
    moment leaves the old file or the new one, never half of one. shard.py saves checkpoints so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

def read_safetensors(path):
    """{name: float32 array} from a .safetensors file: an 8-byte little-endian header length, a
    JSON header of each tensor's dtype, shape and byte range, then the raw little-endian data."""
    try:
        with open(path, 'rb') as f:
            n = int.from_bytes(f.read(8), 'little')
            header = json.loads(f.read(n))
        raw = np.memmap(path, np.uint8, 'r', offset=8 + n)  # read from disk as each tensor is used
        out = {}
        for name, t in header.items():
            if name != '__metadata__':
                a = raw[slice(*t['data_offsets'])].view({'F32': '<f4', 'F16': '<f2', 'BF16': '<u2'}[t['dtype']])
                a = (a.astype('<u4') << 16).view('<f4') if t['dtype'] == 'BF16' else a  # bf16: the top half of a float32
                out[name] = np.array(a, np.float32).reshape(t['shape'])
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a readable safetensors file of F32, F16 or BF16 tensors "
                        f"({type(e).__name__}: {e})") from None

def write_safetensors(path, arrays):  # {name: array}, written as float32, atomically
    header, offset = {}, 0
    for name, a in arrays.items():
        header[name] = dict(dtype='F32', shape=list(a.shape), data_offsets=[offset, offset + 4 * a.size])
        offset += 4 * a.size
    head = json.dumps(header).encode()
    head += b' ' * (-len(head) % 8)  # the data starts 8-byte aligned, as the format asks
    atomic_write(path, lambda f: [f.write(b) for b in (len(head).to_bytes(8, 'little'), head)] +
                 [f.write(np.ascontiguousarray(a, '<f4').tobytes()) for a in arrays.values()])

def lock(folder):
    """Lock folder/lock for as long as this process lives (the OS drops it when the process dies, even
    by kill -9: never stale). -> (the open file, to keep, None), or (None, the holder's pid)."""
    f = open(Path(folder) / 'lock', 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        return None, f.read().strip() or '?'
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f, None

def split_documents(root, files):
    """(train, val) lists of texts. Many files: about 1 in 10 goes to val, chosen by a hash of its
    name so the choice never changes. One file: its last 10% (by characters) is val, as nanoGPT."""
    texts, skipped = [], []
    for p in files:
        raw = p.read_bytes()
        try:  # text is valid UTF-8 without NUL bytes; anything else (.pyc, .npz, images) is skipped
            texts.append((str(p.relative_to(root)), raw.decode('utf-8'))) if b'\0' not in raw else skipped.append(p)
        except UnicodeDecodeError:
            skipped.append(p)
    if skipped:
        print(f"skipped {len(skipped)} of {len(files)} files that are not UTF-8 text, e.g. {skipped[0]}")
    texts = [(name, t) for name, t in texts if t]
    if not texts:
        raise DataError("the dataset is empty: point --data at files that hold text")
    if len(texts) == 1:
        text, cut = texts[0][1], int(len(texts[0][1]) * 0.9)
        return [text[:cut]], [text[cut:]]
    is_val = [i > 0 and zlib.crc32(name.encode()) % 10 == 0 for i, (name, _) in enumerate(texts)]  # the first trains
    is_val[-1] = is_val[-1] or not any(is_val)  # and at least the last validates: never an empty side
    return [t for (_, t), v in zip(texts, is_val) if not v], [t for (_, t), v in zip(texts, is_val) if v]

# --- the token cache -----------------------------------------------------------------------------
def load_tokens(data, tokenizer, cache_dir):
    """--data -> (train, val) uint16 token arrays (np.memmap), tokenizing on first use only."""
    if not data:  # Path('') is the current folder: never read that by accident
        raise DataError("--data is empty: pass stdlib, shakespeare, or a file, folder or glob")
    path = Path(data)
    if (path / 'train.bin').is_file() and (path / 'val.bin').is_file():  # nanoGPT's prepare.py output
        return [np.memmap(path / f'{s}.bin', np.uint16, 'r') for s in ('train', 'val')]
    root, files = source_files(data, cache_dir)
    # the cache is keyed by the tokenizer and a hash of every file's name and contents (reading
    # them costs far less than tokenizing), so any edit makes a new cache, whatever its mtime
    digest = hashlib.sha256(tokenizer.encode())
    for p in files:
        digest.update(str(p.relative_to(root)).encode() + b'\0' + hashlib.sha256(p.read_bytes()).digest())
    folder = Path(cache_dir) / f"{path.name or 'data'}-{tokenizer}-{digest.hexdigest()[:12]}"
    if not (folder / 'val.bin').exists():
        tok = get_tokenizer(tokenizer)
        for split, docs in zip(('train', 'val'), split_documents(root, files)):
            # documents are joined with <|endoftext|>, as GPT-2 was trained
            ids = np.concatenate([np.append(tok.encode(d), np.uint16(tok.eot)) for d in docs])
            atomic_write(folder / f'{split}.bin', ids.tofile)  # val last: its presence marks done
        print(f"tokenized {len(files)} files of {data} into {folder}")
    return [np.memmap(folder / f'{s}.bin', np.uint16, 'r') for s in ('train', 'val')]

# --- the batch stream ----------------------------------------------------------------------------
class Batches:
    """Global batches of (batch_size, T+1) windows; inputs are [:, :-1], targets [:, 1:].

    Each epoch cuts the tokens into non-overlapping windows of T+1 on a grid shifted by a random
    offset, and visits each window once in a random order, both seeded by (seed, epoch): on small data
    a new grid each epoch shows new windows, as nanoGPT's random offsets do. The cursor counts windows
    handed out, so a run resumes at the same window. Row i of a batch goes to data shard
    i // (batch_size / data): each shard its own contiguous slice, never the same window."""

    def __init__(self, tokens, block_size, batch_size, seed, split='train'):
        self.tokens, self.T, self.B, self.seed = tokens, block_size, batch_size, seed
        self.n = (len(tokens) - block_size) // (block_size + 1)  # windows per epoch, any offset
        if self.n < batch_size:
            raise DataError(f"the {split} split has {len(tokens):,} tokens, fewer than one batch of {batch_size} x "
                            f"{block_size + 1} (and a shift): use more data or a smaller --batch_size or --block_size")
        self.epoch = (-1, None, 0)  # (epoch, permutation, offset) of the last epoch used

    def window_starts(self, cursor):
        idx = cursor + np.arange(self.B)
        starts = np.empty(self.B, np.int64)
        for epoch in np.unique(idx // self.n):  # at most two: a batch may straddle an epoch end
            if self.epoch[0] != epoch:
                rng = np.random.default_rng((self.seed, int(epoch)))
                self.epoch = (epoch, rng.permutation(self.n), int(rng.integers(self.T + 1)))
            here = idx // self.n == epoch
            starts[here] = self.epoch[2] + self.epoch[1][idx[here] % self.n] * (self.T + 1)
        return starts

    def get(self, cursor, rows=slice(None)):  # -> (B, T+1) int32 (those rows of it), the next cursor
        batch = np.stack([self.tokens[s:s + self.T + 1] for s in self.window_starts(cursor)[rows]])
        return batch.astype(np.int32), cursor + self.B
