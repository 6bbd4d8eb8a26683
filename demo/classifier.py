"""Top-k classes of images: a timm model with its evaluation preprocessing and class names.

What tools/predict.py and the web demo share. It needs only torch and timm, so that an export folder (which
carries a copy of this file) runs as a Hugging Face Space without the training code.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import timm
import torch
from timm.data import create_transform, resolve_data_config


@dataclass
class Classifier:
    model: torch.nn.Module
    data_cfg: dict  # timm's data config: input_size, interpolation, mean, std, crop_pct, crop_mode
    label_names: list  # per classifier index: an ImageNet synset or a class folder name
    label_descriptions: Optional[dict] = None  # label name -> readable name (ImageNet's lemmas)
    device: torch.device = torch.device('cpu')

    def __post_init__(self):
        self.model.eval().to(self.device)
        self.transform = create_transform(**self.data_cfg)

    @classmethod
    def from_export(cls, folder, device: torch.device = torch.device('cpu')) -> 'Classifier':
        """The model of a folder written by tools/export.py (timm's Hugging Face layout), as timm loads it."""
        folder = Path(folder).resolve()
        model = timm.create_model(f'local-dir:{folder}', pretrained=True)
        names = model.pretrained_cfg.get('label_names') or [str(i) for i in range(model.num_classes)]
        return cls(model, resolve_data_config(model=model), list(names), model.pretrained_cfg.get('label_descriptions'),
                   device)

    def class_name(self, index: int) -> str:
        name = self.label_names[index]
        return (self.label_descriptions or {}).get(name, name)

    @torch.inference_mode()
    def top_k(self, images: list, k: int) -> list:
        """Per image (RGB PIL images, one batch), the k most likely classes as dicts of class, index and prob."""
        batch = torch.stack([self.transform(image) for image in images]).to(self.device)
        probs = self.model(batch).float().softmax(dim=-1)
        values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
        return [[{'class': self.class_name(i), 'index': i, 'prob': p}
                 for p, i in zip(row_values.tolist(), row_indices.tolist())]
                for row_values, row_indices in zip(values, indices)]


def top_k_lines(top: list) -> list:
    """'class (prob%)' for each entry of one image's top-k."""
    return [f"{entry['class']} ({100 * entry['prob']:.1f}%)" for entry in top]
