"""The reference code's view of a dive run: its hyper-parameters under the reference's option
names (what `dive train` logs first, to compare with train_eval_coco.sh), and its validation
subset."""
import numpy as np

from .data.scan import RetrievalSplit


def official_hyperparameters(config) -> dict:
    """The settings the reference's training script fixes, named as its options, for `config`
    (a dive Config). Options dive has no counterpart for are left out; `heads` and `dim_head`
    are constants there (4 and 512)."""
    m, loss, t = config.model, config.loss, config.train
    bigru = m.text_encoder == "bigru"
    return {
        "img_num_embeds": m.num_slots, "txt_num_embeds": m.num_slots,
        "embed_size": m.embed_dim, "spm_input_dim": m.embed_dim, "spm_query_dim": m.embed_dim,
        "word_dim": m.word_dim if bigru else None, "heads": m.heads, "dim_head": m.head_dim,
        "spm_depth": m.depth, "spm_weight_sharing": m.share_weights,
        "spm_ff_mult": m.ff_mult, "spm_activation": "gelu",
        "spm_pre_norm": True, "spm_post_norm": m.block_norm == "post",
        "spm_last_ln": m.block_norm == "pre_final",
        "query_slot": m.slot_init == "gaussian",
        "spm_img_pos_enc_type": "none",
        "spm_txt_pos_enc_type": "sine" if bigru else "none",
        "txt_position_scale": ("normalized (1..L)/L*2pi" if m.word_positions == "normalized"
                               else "index 0..L-1") if bigru else None,
        "img_res_last_fc": m.global_fc, "img_1x1_dropout": m.projection_dropout,
        "dropout": m.dropout, "padding": m.padding,
        "temperature": loss.temperature, "margin": loss.margin,
        "max_violation": loss.hardest, "mmd_weight": loss.mmd_weight,
        "unif_weight": loss.uniformity_weight, "div_weight": loss.diversity_weight,
        "lr": t.lr, "img_pie_lr_scale": t.spm_lr_scale, "txt_pie_lr_scale": t.spm_lr_scale,
        "txt_lr_scale": 1.0, "cnn_lr_scale": 1.0, "optimizer": "adamw",
        "lr_scheduler": "cosine", "lr_warmup_steps": t.warmup_steps,
        "weight_decay": t.weight_decay, "grad_clip": t.grad_clip,
        "num_epochs": t.epochs, "batch_size": t.batch_size, "warm_epoch": t.warm_epochs,
        "caption_drop_prob": t.caption_drop, "butd_drop_prob": t.region_drop,
        "val_images": t.val_images or "all",
    }


def first_images(split: RetrievalSplit, n: int) -> RetrievalSplit:
    """The split's first `n` images and their captions (all of it when n is 0 or >= its
    size): the reference validates on the first 1,000 COCO dev images."""
    if not n or n >= split.num_images:
        return split
    keep = np.flatnonzero(split.caption_image_ids < n)
    return RetrievalSplit(split.images[:n], [split.captions[j] for j in keep],
                          split.captions_per_image, split.image_ids[:n],
                          split.caption_image_ids[keep])
