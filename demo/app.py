"""Web demo: upload an image, see the model's five most likely classes.

    pip install -r demo/requirements.txt
    python demo/app.py export/rn50          # or MODEL_DIR=export/rn50 python demo/app.py

The model is a folder written by tools/export.py: the first argument, else $MODEL_DIR, else the folder this file is
in. tools/export.py copies this file, classifier.py and requirements.txt into each export, so that an export folder
runs as a Hugging Face Space as it is (its README.md header names app.py and the Gradio version). Gradio serves on
http://127.0.0.1:7860 unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say otherwise.
"""
import os
import sys
from pathlib import Path

import gradio as gr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from classifier import Classifier, top_k_lines  # noqa: E402

TOP_K = 5


def model_folder() -> Path:
    return Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get('MODEL_DIR') or HERE).resolve()


def load(folder: Path) -> Classifier:
    """The exported model; architectures of our own come with their definitions (model_defs/) in the folder."""
    if not (folder / 'config.json').is_file():
        sys.exit(f'app.py: error: {folder} holds no model exported by tools/export.py (no config.json)')
    if (folder / 'model_defs' / '__init__.py').is_file():
        sys.path.insert(0, str(folder))
        import model_defs  # noqa: F401  registers our architectures in timm
    return Classifier.from_export(folder)


def build_app(classifier: Classifier, title: str) -> gr.Blocks:
    def classify(image):
        if image is None:
            return None, ''
        top = classifier.top_k([image.convert('RGB')], TOP_K)[0]
        return {entry['class']: entry['prob'] for entry in top}, '\n'.join(top_k_lines(top))

    with gr.Blocks(title=title) as app:
        gr.Markdown(f'# {title}\nUpload an image to see the {TOP_K} most likely of the model\'s '
                    f'{len(classifier.label_names)} classes.')
        with gr.Row():
            image = gr.Image(type='pil', label='image', sources=['upload', 'clipboard'])
            with gr.Column():
                chart = gr.Label(num_top_classes=TOP_K, label=f'top-{TOP_K}')
                text = gr.Textbox(label=f'top-{TOP_K}: class (probability)', lines=TOP_K, elem_id='top-k')
        image.change(classify, inputs=image, outputs=[chart, text])
    return app


if __name__ == '__main__':
    classifier = load(model_folder())
    cfg = classifier.model.pretrained_cfg  # its tag is the name of the run the export came from
    build_app(classifier, f"{cfg['architecture']} ({cfg.get('tag') or 'exported'})").launch()
