"""The one place where the input path is chosen and put together: timm's data configs of a run, and the training
and validation loaders of this process."""
import logging
import math
from dataclasses import dataclass
from typing import Optional

from timm.data import resolve_data_config
from timm.data.random_erasing import RandomErasing

from .cpu_path import create_cpu_eval_loader, create_cpu_train_loader
from .decode_choice import device_path_refusal, resolve_decode
from .device_path import create_gpu_eval_loader, create_gpu_train_loader
from .sampling import BatchLayout, EvalBatchSampler, ImageSizes, TrainBatchSampler, image_sizes
from .sources import Datasets, folder_samples, image_samples

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaders:
    train: object  # yields (images, targets) on the device, one micro-batch at a time
    sampler: 'TrainBatchSampler'
    val: object
    sizes: ImageSizes  # the training image size of each epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch


def resolve_input_path(config: dict, datasets: Datasets, model, device, recorded: Optional[dict]) -> tuple:
    """(decode, cpu_decode_share, why) of a run (see decode_choice.resolve_decode): a share of None is measured by
    decode_choice.choose_share once the loaders and the model are built."""
    train_cfg, val_cfg = data_configs(config, model)
    return resolve_decode(config, device, folder_samples(datasets.train), train_cfg, val_cfg, recorded)


def build_loaders(config: dict, datasets: Datasets, model, layout: BatchLayout, procs) -> Loaders:
    """Training and validation loaders over this process's share of the data, on the input path of config's decode."""
    train_cfg, val_cfg = data_configs(config, model)
    sizes = image_sizes(config, train_cfg['input_size'][-1])
    train, sampler = create_train_loader(datasets.train, config, train_cfg, layout, procs.rank, procs.device, sizes)
    val_batch = config['validation_batch_size'] or layout.micro_batch
    val = create_eval_loader(datasets.val, val_cfg, val_batch, config['workers'], procs.device, procs.rank,
                             procs.world_size, config['max_bad_images'], config['decode'], config['gpu_decoder'])
    return Loaders(train, sampler, val, sizes)


def data_config(config: dict, model, img_size: Optional[int], crop_pct: Optional[float] = None,
                interpolation: Optional[str] = None) -> dict:
    """timm's data config (input size, interpolation, mean, std, crop) of a run's settings, at one image size."""
    overrides = {k: config.get(k) for k in ('interpolation', 'mean', 'std', 'crop_pct') if config.get(k) is not None}
    if crop_pct is not None:
        overrides['crop_pct'] = crop_pct
    if interpolation is not None:
        overrides['interpolation'] = interpolation
    return resolve_data_config(args=dict(overrides, img_size=img_size), model=model)


def data_configs(config: dict, model) -> tuple:
    """Data configs for training (at train_interpolation when set: it may be 'random', which only training takes) and
    for validation (at val_img_size when set)."""
    return (data_config(config, model, config['img_size'], interpolation=config.get('train_interpolation')),
            data_config(config, model, config['val_img_size'] or config['img_size']))


def create_train_loader(dataset, config: dict, data_cfg: dict, layout: BatchLayout, rank: int, device,
                        sizes: Optional[ImageSizes] = None):
    """This process's training loader (a CheckedLoader: close() it when done) and its batch sampler.

    With progressive resizing (`sizes` that change), each epoch trains at its size; the workers persist.
    """
    sampler = TrainBatchSampler(len(dataset), layout, rank, config['seed'], config['aug_repeats'])
    if sampler.repeats > 1:
        positions = sampler.steps_per_epoch * layout.global_batch
        _logger.info(f'Repeated augmentation: each epoch trains {math.ceil(positions / sampler.repeats)} of the '
                     f'{len(dataset)} images {sampler.repeats} times each ({positions} samples)')
    progressive = sizes if (sizes is not None) and (sizes.start is not None) else None
    decode = config['decode']
    if decode == 'auto':
        decode = 'cpu' if device_path_refusal(device, folder_samples(dataset), data_cfg, config, data_cfg) else 'gpu'
    if decode == 'gpu':
        return create_gpu_train_loader(image_samples(dataset), config, data_cfg, sampler, device, progressive), sampler
    return create_cpu_train_loader(dataset, config, data_cfg, sampler, device, progressive), sampler


def create_eval_loader(dataset, data_cfg: dict, batch_size: int, workers: int, device, rank: int = 0,
                       world_size: int = 1, max_bad_images: Optional[float] = None, decode: str = 'cpu',
                       gpu_decoder: str = 'torchvision'):
    """This process's evaluation loader (a CheckedLoader: close() it when done).

    Bad images are replaced and logged; with max_bad_images, more than that share of the shard stops the run.
    """
    sampler = EvalBatchSampler(len(dataset), batch_size, rank, world_size)
    if decode == 'auto':
        decode = 'cpu' if device_path_refusal(device, folder_samples(dataset), data_cfg) else 'gpu'
    if decode == 'gpu':
        return create_gpu_eval_loader(image_samples(dataset), data_cfg, sampler, workers, device, max_bad_images,
                                      gpu_decoder)
    return create_cpu_eval_loader(dataset, data_cfg, sampler, workers, device, max_bad_images)


def create_random_erasing(config: dict, device) -> Optional[RandomErasing]:
    """timm's RandomErasing, applied by the training step on the normalised batch.

    timm's prefetcher would apply it while fetching the next batch, drawing from the global RNG at a moment that
    depends on when the loader started; applied in the step, after the step's seed, a resumed run erases the same.
    """
    if config['re_prob'] <= 0:
        return None
    return RandomErasing(config['re_prob'], mode=config['re_mode'], max_count=config['re_count'], device=device)
