"""DiTTransformer2DModel (class-conditional DiT): epsilon + learned sigma; the sigma
channels are dropped, the pixel model returns epsilon only (DiTPipeline, too, steps its
scheduler on the epsilon half and guides only that half).

The "caption" of an image or a prompt is its class: a name from the pipeline's ``id2label``
(as ``DiTPipeline.get_label_ids`` reads it) or an integer id written as text ("207"); the
empty caption is the null class ``num_embeds_ada_norm`` that DiT guides against (DiTPipeline
writes 1000, the ImageNet models' value)."""

import torch

from l2p.adapters.base import PatchEmbedAdapter

# The empty caption before the transformer's null class replaces it in transformer_kwargs:
# the text side (a pipeline loaded without its transformer) does not know num_classes.
NULL_CLASS = -1


class DiTAdapter(PatchEmbedAdapter):
    source_class = "DiTTransformer2DModel"
    input_module = "pos_embed.proj"
    output_module = "proj_out_2"
    block_groups = ("transformer_blocks",)
    output_modules = ("norm_out", "proj_out_1")
    prediction = "epsilon"

    def check_arguments(self, arguments, rows, cols, patch):
        if rows != cols:
            raise ValueError(
                f"DiTTransformer2DModel only handles square images (its forward unpatchifies "
                f"a square grid); got a {rows}x{cols} token grid"
            )

    def prepare_source(self, transformer):
        # Each block's label embedder drops labels at random in train mode (DiT's class
        # dropout, drawn from the global RNG, independently per block); l2p's caption dropout
        # (data.caption_dropout -> the null class) replaces it, seeded per sample.
        from diffusers.models.embeddings import LabelEmbedding

        for module in transformer.modules():
            if isinstance(module, LabelEmbedding):
                module.dropout_prob = 0.0

    @staticmethod
    def encode_prompts(pipe, prompts, device):
        labels = getattr(pipe, "labels", None) or {}
        ids = []
        for prompt in prompts:
            name = prompt.strip()
            if not name:
                ids.append(NULL_CLASS)
            elif name in labels:
                ids.append(labels[name])
            elif name.isascii() and name.isdigit():
                ids.append(int(name))
            else:
                known = (f"one of its {len(labels)} class names (DiTPipeline.labels, e.g. "
                         f"{', '.join(repr(n) for n in list(labels)[:3])}), " if labels else "")
                raise ValueError(f"{prompt!r} is not a class of this DiT pipeline; a DiT prompt or caption "
                                 f"is {known}a class id as digits (\"207\"), or \"\" for the null class")
        return {"class_labels": torch.tensor(ids, dtype=torch.long, device=device)}

    @staticmethod
    def transformer_kwargs(cond, x_t, times, model, guidance):
        num_classes = int(model.config.source_config["num_embeds_ada_norm"])
        labels = cond["class_labels"]
        if bool(((labels < NULL_CLASS) | (labels >= num_classes)).any()):
            raise ValueError(f"class ids {sorted(set(labels.tolist()))} include some outside 0..{num_classes - 1}, "
                             f"the classes of this DiT")
        labels = torch.where(labels == NULL_CLASS, num_classes, labels)
        return dict(hidden_states=x_t, timestep=times, class_labels=labels)
