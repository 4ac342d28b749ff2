"""A run's folder on disk, written so that a kill at any moment loses nothing: atomic writes,
checkpoints (numpy arrays and a JSON header in one .npz, found by the step they hold), the log
of metrics kept in step with them, and the lock that keeps one run per folder.

Needs: nothing from the other files.
"""
import errno
import fcntl
import json
import os
import re
import stat
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np


def atomic_write(path, write):
    """Call write(f) on a temporary file, flush it to disk, then rename it to path: a kill at any
    moment leaves the old file or the new one, never half of one. A write that fails (a full
    disk) removes its temporary file and leaves the old one as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')  # two writers never share one
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


CHECKPOINT_NAME = re.compile(r'ckpt_(\d+)\.npz')  # ckpt_0000600.npz holds step 600
KILLED_SAVE = re.compile(r'ckpt_\d+\.npz\.\d+\.tmp')  # atomic_write's temporary, as a kill left it


def remove_killed_saves(out_dir):  # only files named as atomic_write names them: not a user's
    for tmp in Path(out_dir).glob('ckpt_*.tmp'):
        if KILLED_SAVE.fullmatch(tmp.name):
            tmp.unlink(missing_ok=True)


def path_for(out_dir, step):
    return Path(out_dir) / f'ckpt_{step:07d}.npz'


def in_folder(out_dir):
    """The checkpoints in out_dir, oldest first by the step in their names; files not named
    exactly as path_for names them (a user's ckpt_old.npz, a .tmp, ckpt_00000012.npz) are not."""
    steps = {}
    for p in Path(out_dir).glob('ckpt_*.npz'):
        match = CHECKPOINT_NAME.fullmatch(p.name)
        if match and p.name == path_for(out_dir, int(match.group(1))).name:
            steps[int(match.group(1))] = p
    return [steps[s] for s in sorted(steps)]


def rotate(out_dir, saved, replacing, keep):
    """After a save: keep the newest `keep` checkpoints. The first save of an --overwrite run
    deletes the old run's (`replacing`, then emptied) and puts its own log in place."""
    if replacing:
        for old in replacing:
            if old != saved:
                old.unlink(missing_ok=True)
        metrics = os.path.join(out_dir, 'metrics.jsonl')
        os.replace(metrics + '.next', metrics)
        replacing.clear()  # once: from here on this run's checkpoints are the folder's
    for old in in_folder(out_dir)[:-keep]:
        old.unlink()


def save(path, arrays, meta):
    """{name: numpy array} and a JSON-able dict -> one .npz file, atomically. No pickle anywhere:
    bf16 is stored as its uint16 bits, the dict as UTF-8 JSON bytes."""
    stored = {k: a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a
              for k, a in arrays.items()}
    stored['__meta__'] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    atomic_write(path, lambda f: np.savez(f, **stored))


def read(path):
    """-> (arrays, meta) of a checkpoint, or a ValueError saying it is corrupt."""
    try:
        if Path(path).exists() and not Path(path).is_file():  # a folder or a FIFO would block
            raise ValueError('not a regular file')
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(arrays.pop('__meta__').tobytes())
    except FileNotFoundError:  # listed a moment ago: something else deletes checkpoints here
        raise ValueError(f"checkpoint {path} vanished while it was being read: is another "
                         "program deleting checkpoints in that folder?") from None
    except Exception as e:  # truncated zip, bad CRC, missing meta, bad JSON: all one to the user
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}): "
                         "delete it to resume from an earlier one") from None
    bf16 = {k: a.view(ml_dtypes.bfloat16) for k, a in arrays.items() if a.dtype == np.uint16}
    return {**arrays, **bf16}, meta


def check_meta(meta, path):
    """Check a training checkpoint's header is as train.py writes it; else a ValueError."""
    def whole(x, below=2**62):
        return type(x) is int and 0 <= x < below

    meta = meta if isinstance(meta, dict) else {}
    key, config, model = meta.get('key'), meta.get('config'), meta.get('model')
    sizes = ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd')
    problems = [name for name, ok in (
        ('step', whole(meta.get('step'))), ('cursor', whole(meta.get('cursor'))),
        ('key', isinstance(key, list) and len(key) == 2 and all(whole(k, 2**32) for k in key)),
        ('config', isinstance(config, dict) and config.get('tokenizer') in ('byte', 'gpt2')),
        ('model', isinstance(model, dict) and all(whole(model.get(k)) and model[k] for k in sizes)
         and whole(model.get('window', 0)) and model.get('pos', 'learned') in ('learned', 'rope')
         and model.get('remat', 'none') in ('none', 'block', 'dots')
         and model.get('attention', 'xla') in ('xla', 'blockwise', 'cudnn')),
        ('params_dtype', meta.get('params_dtype', 'float32') in ('float32', 'bfloat16'))) if not ok]
    if problems:
        raise ValueError(f"checkpoint {path} has no valid {', '.join(problems)} in its header: "
                         "it was not written by train.py; delete it to resume from an earlier one")
    named = CHECKPOINT_NAME.fullmatch(Path(path).name)
    if named and int(named.group(1)) != meta['step']:  # a copy under another step's name
        raise ValueError(f"checkpoint {path} holds step {meta['step']}, not its name's: it was "
                         "copied or renamed; move it away to resume from the others")


def check_same_run(meta, path, implied, tokens_crc):
    """Resuming with its flags: the header's model must be the one they `implied` (the fields that
    say what is computed), its tokens those of `tokens_crc` (train's and val's CRC); else a
    ValueError."""
    if any(meta['model'].get(k, v) != v for k, v in implied.items()):
        raise ValueError(f"checkpoint {path}'s model header does not match its config: it was not "
                         "written by train.py; delete it to resume from an earlier one")
    if meta.get('tokens_crc', tokens_crc) != tokens_crc:  # an older version's has none
        raise ValueError(f"{path} was trained on other tokens than --data holds now (it was "
                         "edited, or its cache replaced): pass the data it was trained on")


def make_out_dir(folder):
    """Make folder, if need be, once it is known that train.py can write there and that its log
    is a file (through a link, a file elsewhere would be written). Else a ValueError."""
    for name in ('metrics.jsonl', 'metrics.jsonl.next'):
        log = os.path.join(folder, name)
        if os.path.lexists(log) and (os.path.islink(log) or not os.path.isfile(log)):
            raise ValueError(f"{log} is a folder, a device or a link, not the log train.py keeps "
                             "there: move it away")
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # can we write there? (leaves nothing)
    except OSError as e:
        raise ValueError(f"--out_dir={folder} cannot be written ({e.strerror}): choose another "
                         "folder") from None


def check_finite(arrays, path):  # a run that diverged may have saved NaN weights
    if not all(np.isfinite(a).all() for k, a in arrays.items() if k.startswith("['params']")
               and np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"checkpoint {path} holds NaN or infinite weights: use an earlier one "
                         "(move this one away)")


def trim_log(path, step):
    """Keep the rows of a JSON-lines log (metrics.jsonl) up to `step`, for a run resuming from its
    checkpoint at that step: rows a killed run logged later, and rows that are not well formed (a
    full disk cuts a line), are dropped, and the count said. A log never stops a resume."""
    def row_step(line):  # the step of a well-formed row, else None
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep
            return None
        return row.get('step') if isinstance(row, dict) and type(row.get('step')) is int else None
    if os.path.exists(path):
        lines = open(path, 'rb').read().splitlines()
        kept = [line + b'\n' for line in lines
                if row_step(line) is not None and row_step(line) <= step]
        atomic_write(path, lambda f: f.write(b''.join(kept)))
        if len(kept) < len(lines):
            print(f"{path}: kept the {len(kept)} rows up to step {step}, dropped "
                  f"{len(lines) - len(kept)} logged after that checkpoint or not well formed")


def open_log(folder, resume, step, replacing):
    """folder/metrics.jsonl, a JSON object a line: each step's loss, each log step's lr, speed
    and tokens seen, each val loss. Resuming, the rows logged after its checkpoint's `step` are
    dropped, so that each step appears once; a run replacing another (--overwrite) logs to .next
    until its first checkpoint. -> log(**row)."""
    path = os.path.join(folder, 'metrics.jsonl' + ('.next' if replacing else ''))
    if resume:
        trim_log(path, step)
    metrics = open(path, 'a' if resume else 'w')

    def log(**row):
        print(json.dumps(row), file=metrics, flush=True)
    return log


def holder(folder):
    """The pid of another live process that holds folder/lock, else None. Reads, writes nothing:
    for the checks before a run takes the lock itself."""
    try:  # never waiting on a FIFO
        f = os.fdopen(os.open(Path(folder) / 'lock', os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK))
    except OSError:  # no lock file: no run
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released as f closes
            return None
        except BlockingIOError:
            pid = f.read().strip()
            return None if pid == str(os.getpid()) else pid or '?'


def lock(folder):
    """Lock folder/lock for as long as this process lives (the OS drops the lock when the process
    dies, even by kill -9: never stale). -> (the open file, to keep, None), or (None, the pid of
    the process that holds it)."""
    try:  # never through a link: the pid would be written into whatever it points at
        fd = os.open(Path(folder) / 'lock', os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device
            os.close(fd)
            raise OSError(errno.EINVAL, 'not a regular file')
        f = os.fdopen(fd, 'r+')
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return None, f.read().strip() or '?'
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
    except OSError as e:  # a lock that is a link to a device, a folder, on a full disk
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ValueError(f"{folder}/lock cannot be written ({e.strerror}): free some space, "
                             "or pass another --out_dir") from None
        raise ValueError(f"{folder}/lock cannot be used as a lock ({e.strerror}): delete it (a "
                         "lock no live run holds is safe to delete) or pass another --out_dir")
    return f, None
