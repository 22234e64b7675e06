"""What every training script needs besides its model, written once: the run's machinery.

vae.py, dcgan.py, lsgan.py and wgan.py keep the lesson (the objective, the networks, the
updates) and call this module in one line where something of the machinery happens:

    add_run_flags(parser, ...)       the flags every script has: data, epochs, device, output, resume
    run = Run(parser, argv, ...)     parse and check the command line, refuse what would lose a
                                     run's files, resume settings from a checkpoint, set up the
                                     device and seeds, and join the other processes under torchrun
    run.load_images()                the dataset as one uint8 tensor (N, 3, S, S) on the device
    run.wrap(module)                 torch.compile (--compile) and DistributedDataParallel (torchrun)
    run.restore(...) / run.save(...) checkpoints: exact resume (weights, optimizers, random states)
    run.log(step, loss=...)          curves and progress bar, every --log-every steps
    run.stop_if_nonfinite()          exit if a logged loss was NaN or inf (the last good checkpoint kept)
    run.stop_requested()             True after Ctrl-C or SIGTERM: save and stop
    ema_update(G_ema, G, decay)      the moving average of G's weights that samples come from
    parse_augment(spec)              --augment's value -> fused_op.random_affine's arguments

Several processes (torchrun, DistributedDataParallel): every process draws the same random
numbers for the whole --batch-size and keeps its own rows (the scripts' `mine`: rows run.rank *
B / run.world onwards), so one process is exactly a plain `python` run, and a checkpoint has no
rank in it. Process 0 (the global RANK) writes every file and prints every line; the losses are
averaged over the processes before they are logged, so every process takes the same NaN and
Ctrl-C decision at the same step.
"""

import argparse
import contextlib
import datetime
import hashlib
import inspect
import os
import signal
import sys
import tempfile
import textwrap

import torch
import torch.distributed as dist
from tqdm import tqdm

from ganlab import data
from ganlab import flags
from ganlab.outputs import (CheckpointError, CurveLog, is_temporary_file, load_checkpoint, save_checkpoint,
                            save_grid, write_error, write_samples)

DATASETS = {"shapes": "the built-in icons, the default", "lld": "LLD-icon, the logo hand-in", "anime": "anime faces"}
# settings that belong to one command, never taken from a checkpoint
PER_COMMAND = ["resume", "out", "sample", "zip", "force", "device", "compile", "sync_batchnorm"]


def add_run_flags(parser, epochs, batch_size, augment="none", what_samples="G's samples"):
    """The flags shared by the four scripts, in three groups: data, run, output."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", default="shapes", help="shapes (built in), lld, anime, or a folder/file of images")
    group.add_argument("--data-root", default=None, help="folder that holds the datasets (lld/, anime/); "
                       "if not given: $GANLAB_DATA, else data/ in the checkout")
    group.add_argument("--image-size", type=flags.positive_int, default=None,
                       help="side of the images in pixels; if not given: the checkpoint's, or 32 for shapes and lld, "
                            "64 for anime, a folder's, zip's, .hdf5's or .pkl's own")
    group.add_argument("--max-images", type=flags.positive_int, default=None,
                       help="use only the first N images (quick runs); if not given: all")
    group.add_argument("--max-pixels", type=flags.positive_int, default=data.MAX_PIXELS,
                       help="skip (with a warning) images of more pixels than this, before decoding them")
    group.add_argument("--augment", default=augment,
                       help="geometric augmentation of the real images: comma-separated flip[=probability 0.5], "
                            "translate[=fraction 0.125], scale[=max zoom 1.25], rotate[=degrees 10], or none")
    group = parser.add_argument_group("run")
    group.add_argument("--epochs", type=flags.nonnegative_int, default=epochs,
                       help="train until this many epochs are done in all (0: only sample)")
    group.add_argument("--batch-size", type=flags.positive_int, default=batch_size,
                       help="images per update, over all processes under torchrun")
    group.add_argument("--seed", type=flags.seed, default=0, help="seed of every random draw (reproducible runs)")
    group.add_argument("--device", type=flags.device, default="auto",
                       help="auto (cuda if available), cpu, cuda, cuda:1, ... (torchrun: each process its own GPU)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the networks (faster steps after a slow first one)")
    group.add_argument("--sync-batchnorm", action="store_true",
                       help="torchrun on GPUs: BatchNorm statistics over the whole batch, not each process's share")
    group.add_argument("--log-every", type=flags.positive_int, default=20,
                       help="steps between fetches of the losses (progress bar, curves, NaN check)")
    group = parser.add_argument_group("output")
    group.add_argument("--out", default=None,
                       help="output folder; if not given: out/<script>-<data>, or with --resume its folder")
    group.add_argument("--resume", default=None, metavar="CKPT",
                       help="continue from this checkpoint; settings not given here come from it")
    group.add_argument("--sample", type=flags.nonnegative_int, default=0, metavar="N",
                       help=f"after training, write N of {what_samples} as <out>/samples/1.png ... N.png")
    group.add_argument("--zip", default=None, metavar="NAME",
                       help="with --sample: also write <out>/NAME.zip holding the folder NAME/ with the PNGs")
    group.add_argument("--force", action="store_true",
                       help="overwrite the samples (and zip) of an earlier run, or start a new run over an old one")


def parse_augment(spec):
    """'flip,translate=0.1' -> keyword arguments of fused_op.random_affine; 'none' -> the identity."""
    defaults = {"flip": 0.5, "translate": 0.125, "scale": 1.25, "rotate": 10.0}
    ranges = {"flip": (0, 1, "a probability from 0 to 1"), "translate": (0, 1, "a fraction from 0 to 1"),
              "scale": (1, 4, "a zoom from 1 to 4"), "rotate": (0, 180, "degrees from 0 to 180")}
    kwargs = {"flip": 0.0}
    for item in spec.split(","):
        name, _, value = item.strip().partition("=")
        if name in ("", "none"):
            continue
        if name not in defaults:
            raise ValueError(f"--augment: unknown {name!r}; use flip, translate, scale, rotate or none")
        try:
            kwargs[name] = float(value) if value else defaults[name]
        except ValueError:
            raise ValueError(f"--augment: {name}={value!r} is not a number") from None
        low, high, meaning = ranges[name]
        if not low <= kwargs[name] <= high:
            raise ValueError(f"--augment: {name}={value} is out of range: give {meaning}")
    if "scale" in kwargs:
        kwargs["scale"] = (1.0, kwargs["scale"])  # zoom in by up to this factor: a random crop
    return kwargs


def ema_update(G_ema, G, decay, step):
    """ema = d * ema + (1 - d) * G after each G update, with d = min(decay, (1 + step) / (10 + step)):
    small at first, so that early samples are not the random initialization. Samples from the
    average are smoother than from G itself, whose weights chase a moving opponent."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for p_ema, p in zip(G_ema.parameters(), G.parameters()):
            p_ema.lerp_(p, 1 - d)


def _first_nonfinite(value, where=""):
    """The name of the first float tensor in a checkpoint (nested dicts, lists) with a NaN or inf, or None."""
    if isinstance(value, torch.Tensor):
        return where if value.is_floating_point() and not torch.isfinite(value).all() else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _first_nonfinite(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


_HELD = {}  # lock file -> its open file: the run folders this process holds (until it ends)


def _lock_path(folder):
    key = hashlib.sha256(os.path.abspath(folder).encode()).hexdigest()[:20]
    return os.path.join(tempfile.gettempdir(), "ganlab-run-locks", key + ".lock")


def _hold_run_folder(folder):
    """Hold `folder` for this process: an exclusive POSIX lock, which dies with the process, on a
    lock file named after the folder's absolute path in the temp folder (nothing is written in or
    beside the run folder). -> None, or what the process that holds it wrote (its PID)."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): one run per folder is then up to the user
        return None
    path = _lock_path(folder)
    if path in _HELD:
        return None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "a+")
    except OSError:  # a temp folder this user cannot write (another user's lock folder): no lock
        return None
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        return holder
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _HELD[path] = f
    return None


def _remove_leftovers(folder):
    """Delete the temporary files that killed runs left in `folder` (and its grids/, samples/): only
    the kind outputs.py writes (outputs.is_temporary_file), only when this
    process holds the folder. -> how many were removed."""
    if _lock_path(folder) not in _HELD:
        return 0
    removed = 0
    for sub in (folder, os.path.join(folder, "grids"), os.path.join(folder, "samples")):
        try:
            names = os.listdir(sub)
        except OSError:
            continue
        for name in names:
            if is_temporary_file(name) and os.path.isfile(os.path.join(sub, name)):
                os.remove(os.path.join(sub, name))
                removed += 1
    return removed


def _release_run_folder(folder):
    """Let `folder` go (the run is over): another process may then hold it."""
    f = _HELD.pop(_lock_path(folder), None)
    if f is not None:
        f.close()  # closing the file gives its lock back


def _torchrun():
    """(rank, local rank, world size) when started by torchrun, else None."""
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise SystemExit("RANK, LOCAL_RANK and WORLD_SIZE must all be set, as torchrun sets them: start several "
                         "processes with torchrun --nproc-per-node N SCRIPT.py ..., one with plain python")


class Run:
    """One training run: its settings (args), device, processes, checkpoint, curves and files."""

    def __init__(self, parser, argv, script_file, must_match, curve_groups=None, data_defaults=None):
        script = self.script = os.path.splitext(os.path.basename(script_file))[0]  # dcgan, ...
        self.parser = parser
        data_defaults = data_defaults or {}
        parser.epilog = "\n".join(  # --help lists them
            textwrap.fill(f"with --data {name} ({DATASETS[name]}) these defaults change: "
                          + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in table.items()), 100,
                          break_on_hyphens=False) for name, table in data_defaults.items()) or None
        args = self.args = parser.parse_args(argv)
        self.checkpoint = self._resume_settings(argv, must_match) if args.resume else None
        if args.data in data_defaults and not args.resume:  # a resumed run has its own settings
            given = self._given(argv)
            for key, value in data_defaults[args.data].items():
                if key not in given:
                    setattr(args, key, value)
        self.error = parser.error
        if not args.resume and args.epochs == 0:
            self.error("--epochs 0 trains nothing: give --resume CKPT to sample a trained run, or --epochs N")
        if args.zip is not None and not args.sample:
            self.error("--zip NAME needs --sample N")
        try:
            self.affine_ranges = parse_augment(args.augment)  # random_affine's arguments
        except ValueError as error:
            self.error(str(error))

        # where the files go: --out, else the checkpoint's own folder, else out/<script>-<data>
        if args.out is None:
            args.out = (os.path.dirname(os.path.abspath(args.resume)) if args.resume else
                        os.path.join("out", f"{script}-{os.path.basename(os.path.normpath(args.data))}"))
        self.ckpt_path = os.path.join(args.out, "checkpoint.pt")
        self.samples_dir = os.path.join(args.out, "samples")
        self._check_outputs()

        # processes and device: torchrun starts one process per GPU (or several on the CPU)
        self.rank, self.world = 0, 1
        launched = _torchrun()
        self.distributed = launched is not None  # a process group, even of one process
        if launched:
            self.rank, local_rank, self.world = launched
        self.main = self.rank == 0
        holder = _hold_run_folder(args.out) if self.main else None  # process 0 writes every file
        if holder:
            self.error(f"{args.out} is in use by another run (process {holder}): wait for it to end, or choose "
                       "another --out")
        leftovers = _remove_leftovers(args.out) if self.main else 0
        if leftovers:
            self.print(f"removed {leftovers} temporary file(s) that a killed run left in {args.out}")
        try:
            device = flags.resolve_device(args.device)
        except ValueError as error:
            self.error(str(error))
        if launched:
            device = self._join(device, local_rank)
        self.device = device
        if args.batch_size % self.world:
            self.error(f"--batch-size {args.batch_size} is the batch of all {self.world} processes: "
                       f"give a multiple of {self.world}")
        if args.sync_batchnorm and (device.type != "cuda" or self.world == 1):
            self.error("--sync-batchnorm needs torchrun with several processes on CUDA GPUs "
                       "(PyTorch's SyncBatchNorm has no CPU version)")
        self.start_epoch = self.checkpoint["epoch"] if self.checkpoint else 0
        if self.checkpoint and 0 < args.epochs < self.start_epoch:  # would do nothing, and say nothing
            self.error(f"{args.resume} has trained {self.start_epoch} epochs, more than --epochs {args.epochs}: "
                       f"give --epochs N above {self.start_epoch} to train on, or --epochs 0 --sample N to sample it")
        self.epochs_left = max(0, args.epochs - self.start_epoch)  # 0: only sample a finished run

        torch.manual_seed(args.seed)  # the same seed in every process: the same random numbers
        # bf16 autocast on the GPU (float32's range, so no loss scaling, unlike fp16); fp32 on the CPU
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else contextlib.nullcontext())
        self.image_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.augment_gen = torch.Generator().manual_seed(args.seed)  # every augmentation parameter
        self.curves = CurveLog(every=args.log_every, groups=curve_groups,
                               reduce=self._average if self.world > 1 else None)  # the mean over the processes
        self._stop, self._saved, self._bar, self._handlers, self._wrapped = [], None, None, {}, []
        self._last_step, self._fetched = None, False

    # -------------------------------------------------------------------------
    # the command line

    def _resume_settings(self, argv, must_match):
        """Load --resume, refuse a checkpoint of another script or another model, and take from it
        every setting not given on this command line (except the PER_COMMAND ones)."""
        args = self.args
        if os.path.isdir(args.resume):
            self.parser.error(f"--resume {args.resume} is a folder: give its checkpoint, "
                              f"{os.path.join(args.resume, 'checkpoint.pt')}")
        try:
            checkpoint = load_checkpoint(args.resume)
        except CheckpointError as error:
            self.parser.error(str(error))
        bad = _first_nonfinite(checkpoint)
        if bad:  # resuming from it would train on (or sample) NaN weights without a word
            self.parser.error(f"{args.resume} holds NaN or infinite values in {bad}: it cannot be resumed; resume "
                              "from an earlier checkpoint (with a lower learning rate), or train a new run")
        writer = checkpoint.get("script") if isinstance(checkpoint, dict) else None
        if writer != self.script or not isinstance(checkpoint.get("args"), dict):
            who = f"{writer}.py" if writer else "an older version of this project or another program"
            self.parser.error(f"--resume {args.resume} was written by {who}, not {self.script}.py: resume it with "
                              f"{writer + '.py' if writer else 'that program'}, or train a new run without --resume")
        given = self._given(argv)
        saved = checkpoint["args"]
        for key in must_match:
            if key in given and getattr(args, key) != saved.get(key):
                flag = "--" + key.replace("_", "-")
                self.parser.error(f"{args.resume} was trained with {flag} {saved.get(key)}, not {getattr(args, key)}: "
                                  f"leave {flag} out to use the checkpoint's, or train a new run without --resume")
        for key, value in saved.items():
            if key not in given and key not in PER_COMMAND and hasattr(args, key):
                setattr(args, key, value)
        return checkpoint

    def _given(self, argv):
        """The settings given on the command line. Parsed again over a namespace of markers:
        argparse then fills in no defaults, so what is still a marker was not given."""
        marker = object()
        probe = self.parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(self.args), marker)))
        return {key for key, value in vars(probe).items() if value is not marker}

    def _check_outputs(self):
        """Refuse now, before any work, what would fail or destroy another run's files later."""
        args = self.args
        try:
            flags.check_output_folder(args.out)
        except ValueError as error:
            self.error(str(error))
        resuming_here = args.resume and os.path.abspath(args.resume) == os.path.abspath(self.ckpt_path)
        if os.path.exists(self.ckpt_path) and not resuming_here and not args.force:
            self.error(f"{args.out} holds a run ({self.ckpt_path}): pass --resume {self.ckpt_path} to continue "
                       "or sample it, --force to replace it, or choose another --out")
        if args.sample and os.path.isdir(self.samples_dir) and os.listdir(self.samples_dir) and not args.force:
            self.error(f"{self.samples_dir} is not empty: pass --force to overwrite it, or choose another --out")
        if args.zip is not None:
            name = args.zip.removesuffix(".zip")
            if not name or name in (".", "..") or "/" in name or os.sep in name:
                self.error(f"--zip wants a plain name such as 0860912_img, got {args.zip!r}")
            if os.path.exists(os.path.join(args.out, name + ".zip")) and not args.force:
                self.error(f"{os.path.join(args.out, name + '.zip')} exists: pass --force to overwrite it, "
                           "or choose another --out or --zip")

    # -------------------------------------------------------------------------
    # processes: torchrun and DistributedDataParallel

    def _join(self, device, local_rank):
        """Join the process group torchrun set up: NCCL between GPUs, gloo between CPU processes."""
        if device.type == "cuda":
            if self.args.device not in ("auto", "cuda"):
                self.error(f"--device {self.args.device}: under torchrun each process takes cuda:LOCAL_RANK; "
                           "pass --device cuda (or leave it out)")
            if local_rank >= torch.cuda.device_count():
                self.error(f"process {self.rank} has LOCAL_RANK {local_rank}, but this machine has "
                           f"{torch.cuda.device_count()} GPU(s): give torchrun --nproc-per-node "
                           f"{torch.cuda.device_count()} or fewer")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=10))
        except Exception as error:
            raise SystemExit(f"{self.script}: process {self.rank} could not reach the others ({error}). Check that "
                             "every machine was started with the same --nnodes, --master-addr and --master-port, "
                             "that the master's port is open between the machines, and that one --node-rank is 0")
        return device

    def wrap(self, module):
        """The module the training steps call: torch.compile'd with --compile, and under torchrun
        wrapped in DistributedDataParallel (which averages the gradients over the processes in
        backward()). Checkpoints save the plain module: a wrapper prefixes every key."""
        if self.distributed:
            if self.args.sync_batchnorm:
                module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
            # broadcast_buffers=False: BatchNorm's running statistics stay each process's own (the
            # training steps use batch statistics anyway); broadcasting them at every forward
            # breaks two forwards of D before one backward on torch 2.6+ (pytorch/pytorch#175024)
            ddp = torch.nn.parallel.DistributedDataParallel
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                       else {"broadcast_buffers": False})  # its newer name (torch 2.13 warns on the old)
            module = ddp(module, device_ids=[self.device] if self.device.type == "cuda" else None, **no_sync)
            self._wrapped.append(module)
        return torch.compile(module) if self.args.compile else module

    def _average(self, values):
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values / self.world

    def _check_in_sync(self, modules):
        """Under torchrun: every process must hold the same weights; stop if they drifted apart."""
        if self.world == 1:
            return
        for name, module in modules.items():
            if not isinstance(module, torch.nn.Module):
                continue
            flat = torch.cat([p.detach().float().flatten() for p in module.parameters()])
            low, high = flat.clone(), flat.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            if not torch.equal(low, high):  # every process sees this: all leave the group cleanly, then stop
                self.finish()
                raise SystemExit(f"{self.script}: the weights of {name} differ between the processes "
                                 "(they drifted apart): this is a bug, please report it")

    # -------------------------------------------------------------------------
    # data

    def load_images(self):
        """The dataset as one uint8 tensor (N, 3, S, S) on the device; sets --image-size if not given."""
        args = self.args
        data.set_max_pixels(args.max_pixels)
        try:
            bank = data.load_images(args.data, root=args.data_root, size=args.image_size, limit=args.max_images)
        except (FileNotFoundError, ValueError, OSError) as error:  # unknown name, missing or unreadable files
            self.error(str(error))
        bank = bank[: args.max_images].contiguous() if args.max_images else bank
        if args.image_size is None and bank.shape[-1] < 8:  # the size came from the data's first image
            self.error(f"{args.data}: its images came out {bank.shape[-1]}x{bank.shape[-1]}, the size of its first "
                       "image (used when --image-size is not given; a folder of mixed sizes?): give --image-size N, "
                       "e.g. 32, to resize them all")
        args.image_size = args.image_size or bank.shape[-1]
        return bank.to(self.device)

    # -------------------------------------------------------------------------
    # checkpoints

    def restore(self, **state):
        """Resume: load each named module / optimizer / tensor from the checkpoint (None: skipped),
        and the random states and curves. Returns the checkpoint (position fields: step, epoch, ...).
        An optimizer keeps this command's learning rate, so a resume can change it."""
        checkpoint = self.checkpoint
        for name, value in state.items():
            if value is None:
                continue
            if isinstance(value, torch.optim.Optimizer):
                lrs = [group["lr"] for group in value.param_groups]
                value.load_state_dict(checkpoint[name])
                for group, lr in zip(value.param_groups, lrs):
                    group["lr"] = lr
            elif isinstance(value, torch.nn.Module):
                value.load_state_dict(checkpoint[name])
            else:
                value.copy_(checkpoint[name])
        torch.set_rng_state(checkpoint["rng"]["cpu"])
        if self.device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], self.device)
        self.augment_gen.set_state(checkpoint["rng"]["augment"])
        self.curves.load_state_dict(checkpoint["curves"])
        self.print(f"resumed {self.args.resume}: epoch {checkpoint['epoch']}, step {checkpoint['step']}")
        return checkpoint

    def save(self, position, **state):
        """Write the checkpoint (process 0, atomically) and the curves, unless a loss went NaN or
        infinite since the last fetch: then the last good checkpoint stays as it is."""
        self.curves.flush()
        self.stop_if_nonfinite()
        self._check_in_sync(state)
        saved = {name: self._state_dict(value) for name, value in state.items()}  # in every process
        if self.main:
            rng = {"cpu": torch.get_rng_state(), "augment": self.augment_gen.get_state(),
                   "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
            try:
                save_checkpoint(dict(saved, **position, script=self.script, args=vars(self.args), rng=rng,
                                     curves=self.curves.state_dict()), self.ckpt_path)
                self.save_curves()
            except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
                kept = (f"the checkpoint of step {self._saved} is unchanged" if self._saved is not None else
                        f"{self.args.resume} is unchanged" if self.args.resume else "no checkpoint was written")
                self.finish()
                _release_run_folder(self.args.out)
                raise SystemExit(f"{self.script}: writing {self.ckpt_path} at step {position['step']} failed "
                                 f"({write_error(error, self.args.out)}); {kept}. Free some space, then resume "
                                 "(or run again)") from None
        self._saved = position["step"]

    def _state_dict(self, value):
        """What a checkpoint keeps of a module, optimizer or tensor. Under torchrun, BatchNorm's
        running statistics are each process's own: the checkpoint holds their mean."""
        if not hasattr(value, "state_dict"):
            return value
        state = value.state_dict()
        if self.world > 1 and isinstance(value, torch.nn.Module):
            for name, buffer in value.named_buffers():
                if buffer.is_floating_point():
                    state[name] = self._average(buffer.detach().clone())
        return state

    def save_curves(self):
        if self.main:
            self.curves.save(self.args.out, title=f"{self.script} on {self.args.data}")

    def save_grid(self, images, epoch=None, step=None):
        """grid.png, and a copy grids/epoch-E-step-S.png when given the epoch (process 0)."""
        if self.main:
            if epoch is not None:
                save_grid(images, os.path.join(self.args.out, "grids", f"epoch-{epoch:04d}-step-{step}.png"))
            save_grid(images, os.path.join(self.args.out, "grid.png"))

    # -------------------------------------------------------------------------
    # the loop: progress, curves, NaN and Ctrl-C

    def start(self, total_steps, done_steps, images_per_step):
        """Before the first step: the progress bar, and Ctrl-C (or SIGTERM) -> stop after this step."""
        self._images_per_step = images_per_step
        self._bar = tqdm(total=total_steps * images_per_step, initial=done_steps * images_per_step, unit="img",
                         unit_scale=True, dynamic_ncols=True, disable=not (self.main and self.epochs_left))
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._handlers[sig] = signal.signal(sig, self._request_stop)

    def _request_stop(self, signum, frame):
        if self._stop and self.world == 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: quit at once, without a checkpoint
        if not self._stop:
            if self.world > 1:
                when = " at the next --log-every step, in every process"
            else:
                when = " (press again to quit without one)" if signum == signal.SIGINT else ""
            what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            self.write(f"{what}: saving a checkpoint and stopping{when}")
        # under torchrun the launcher forwards the terminal's Ctrl-C: a second one is not a second press
        self._stop.append(signum)

    def log(self, step, epoch, **values):
        """Record this step's losses (0-dim tensors, left on the device); every --log-every steps
        fetch them (averaged over the processes) and update the progress bar."""
        shown = self.curves.append(step, **values)
        self._last_step, self._fetched = step, shown is not None
        if shown:
            self._bar.update(step * self._images_per_step - self._bar.n)
            self._bar.set_postfix_str(f"epoch {epoch + 1} " + " ".join(f"{k} {v:.3f}" for k, v in shown.items()))

    def stop_requested(self):
        """True when the run must stop after this step: Ctrl-C or SIGTERM came. Under torchrun every
        process decides at the step whose losses log() just fetched, the one host sync every
        --log-every steps (one all_reduce there, nothing in between)."""
        if self.world == 1:
            return bool(self._stop)
        if not self._fetched:
            return False
        stop = torch.tensor([float(bool(self._stop))], device=self.device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return stop.item() > 0

    def stop_if_nonfinite(self):
        """If a loss fetched by log() was NaN or infinite: stop with a message (SystemExit), keeping the
        last good checkpoint. Every process sees the same averaged losses, so all stop at the same step."""
        if self.curves.nonfinite:
            bad_step, name = self.curves.nonfinite
            self.save_curves()
            lower = "lower the learning rate"
            kept = (f"the last good checkpoint, {self.ckpt_path} (step {self._saved}), is kept: {lower} and resume "
                    "from it" if self._saved is not None else
                    f"the checkpoint it resumed from, {self.args.resume}, is unchanged: {lower} and resume from it"
                    if self.args.resume else f"no checkpoint had been written yet: {lower}")
            self.finish()
            raise SystemExit(f"{self.script}: {name} is NaN or infinite at step {bad_step}: stopping; {kept}.")

    def stopped(self, step):
        """After Ctrl-C or SIGTERM (the checkpoint saved): say how to go on, and exit with 128 + the
        signal's number (130, 143), as a killed program would: the run did not finish, and a scheduler
        or a shell script must see it."""
        launcher = "torchrun <the same launcher flags>" if self.distributed else "python"
        samples = f" {self._sample_flags()}" if self.args.sample else ""
        self.print(f"stopped at step {step}; continue with: {launcher} {self.script}.py --resume {self.ckpt_path}"
                   f"{samples}" + (" (--sample was not done: the run has not finished)" if samples else ""))
        self.finish()
        _release_run_folder(self.args.out)
        raise SystemExit(128 + (self._stop[0] if self._stop else signal.SIGINT))

    def _sample_flags(self):
        """--sample N [--zip NAME] of this command: they are never taken from a checkpoint."""
        return f"--sample {self.args.sample}" + (f" --zip {self.args.zip}" if self.args.zip else "")

    def finish(self):
        """Close the progress bar, give the signal handlers back, leave the process group."""
        if self._bar is not None:
            if self._last_step is not None:  # steps after the last --log-every one
                self._bar.update(self._last_step * self._images_per_step - self._bar.n)
            self._bar.close()
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        self._handlers = {}
        if dist.is_initialized():
            # drop the DDP wrappers' hold on the process group first: freed later, from Python with
            # the GIL held, a gloo group's destructor can deadlock with its own worker thread
            for module in self._wrapped:
                module.reducer = None
            self._wrapped = []
            dist.destroy_process_group()

    # -------------------------------------------------------------------------
    # printing and samples: process 0 only

    def print(self, text):
        if self.main:
            print(text, flush=True)

    def write(self, text):
        """Print above the progress bar."""
        if self.main:
            tqdm.write(text)

    def write_samples(self, generate):
        """--sample N: samples/1.png ... N.png (and --zip NAME.zip) from generate(count), which
        returns a batch of at most count images. Process 0 alone writes them, the same files
        whatever the number of processes."""
        args = self.args
        try:
            if args.sample and self.main:
                self._write_samples(generate)
        finally:
            _release_run_folder(args.out)  # the run is over: the folder is free for the next one

    def _write_samples(self, generate):
        """write_samples, with a full disk, Ctrl-C or SIGTERM turned into one line that says how to go on."""
        args = self.args
        again = (f"python {self.script}.py --resume {self.ckpt_path} --epochs 0 {self._sample_flags()} --force"
                 if os.path.isfile(self.ckpt_path) else "the same command with --force")
        handlers = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            folder, zip_path = write_samples(generate, args.sample, self.samples_dir, force=args.force,
                                             zip_name=args.zip)
        except _Stop as stop:  # write_samples removed its unfinished zip
            print(f"{self.script}: {signal.Signals(stop.signum).name} while writing the samples: "
                  f"{self.samples_dir} is incomplete and no zip was written; the checkpoint is whole. Write "
                  f"them with: {again}", file=sys.stderr, flush=True)
            raise SystemExit(128 + stop.signum) from None
        except OSError as error:  # its message says what was written, and what to do
            raise SystemExit(f"{self.script}: {error.strerror or error}; the command: {again}") from None
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        size = args.image_size
        print(f"wrote {args.sample} samples ({size}x{size} RGB) to {folder}" + (f" and {zip_path}" if zip_path else ""))


class _Stop(BaseException):
    """Ctrl-C or SIGTERM while samples are written: unwinds write_samples (which then cleans up)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum, frame):
    raise _Stop(signum)

