"""Checkpoints of the reference implementation (github.com/kdwonn/DivE) as dive models and runs.

The reference's train.py saves `torch.save({"args": argparse.Namespace, "epoch": int,
"best_score": float, "model": state_dict})` (ckpt.pth.tar; keys prefixed "module." when it ran
under DataParallel). The file is read with `torch.load(weights_only=True)`, allowing only
`argparse.Namespace` beyond tensors and plain containers: no code in the file runs. Its stored
options give the dive config (`config_from_options`), every tensor is renamed to dive's layout
(`map_state_dict`, which fails listing unmapped, missing and mis-shaped keys), and
`convert_official` writes a run folder that `dive evaluate` reads.

Official key layout (a_ = image, t_ = text encoder; i = round, all rounds listed even when their
weights are shared; "spm" = SetPredictionModule, "ab" = spm.agg_block):
    img_enc.fc.{weight,bias}                      (D, F), (D)    projection
    img_enc.mlp.fc1.*, mlp.bn.bn.*, mlp.fc2.*     (D/2, D) ... BatchNorm1d(D/2), (D, D/2)
    img_enc.residual_last_fc.*                    (D, D)         only with --img_res_last_fc
    img_enc.cnn.<torchvision resnet keys>         CNN setting (data_name coco / f30k)
    txt_enc.embed.weight                          (V, word_dim)
    txt_enc.rnn.{weight,bias}_{ih,hh}_l0[_reverse] bi-GRU, hidden D (--gpo_rnn)
    txt_enc.bert.*, txt_enc.linear.*              BERT setting (--use_bert)
    <enc>.spm.residual_norm.*                     LayerNorm(D) on the global feature
    <enc>.spm.agg_block.latents                   (K, D) learned slots, or slots_mu /
                                                  slots_log_sigma (1, 1, D) with --query_slot
    ab.layers.i.0.norm.*, .0.norm_context.*       pre-norms of slots and tokens
    ab.layers.i.0.fn.to_{q,k,v}.weight            (4*512, D) / (4*512, token_dim)
    ab.layers.i.0.fn.to_out.0.*                   (D, 4*512)
    ab.layers.i.1.norm.*, ab.layers.i.3.norm.*    post-norms (--spm_post_norm only)
    ab.layers.i.2.norm.*, .2.fn.net.{0,3}.*       feed-forward pre-norm and linears
    ab.last_layer.0.*                             final LayerNorm (--spm_last_ln, no post-norm)
"""
import argparse
import math
import pickle
import re
from pathlib import Path
from typing import Optional

import torch

from .config import ModelConfig

# torchvision ResNet children kept by dive's ResNetEncoder (avgpool and fc dropped).
_RESNET_CHILDREN = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}

_SPM_RULES = [
    (r"residual_norm\.(.+)", r"global_norm.\1"),
    (r"agg_block\.latents", r"block.slots"),
    (r"agg_block\.slots_mu", r"block.slot_mean"),
    (r"agg_block\.slots_log_sigma", r"block.slot_log_sigma"),
    (r"agg_block\.layers\.(\d+)\.0\.norm\.(.+)", r"block.rounds.\1.slot_norm.\2"),
    (r"agg_block\.layers\.(\d+)\.0\.norm_context\.(.+)", r"block.rounds.\1.token_norm.\2"),
    (r"agg_block\.layers\.(\d+)\.0\.fn\.(to_[qkv])\.weight",
     r"block.rounds.\1.attention.\2.weight"),
    (r"agg_block\.layers\.(\d+)\.0\.fn\.to_out\.0\.(.+)", r"block.rounds.\1.attention.to_out.\2"),
    (r"agg_block\.layers\.(\d+)\.1\.norm\.(.+)", r"block.attention_norms.\1.\2"),
    (r"agg_block\.layers\.(\d+)\.2\.norm\.(.+)", r"block.rounds.\1.ff_norm.\2"),
    (r"agg_block\.layers\.(\d+)\.2\.fn\.net\.([03])\.(.+)", r"block.rounds.\1.ff.\2.\3"),
    (r"agg_block\.layers\.(\d+)\.3\.norm\.(.+)", r"block.ff_norms.\1.\2"),
    (r"agg_block\.last_layer\.0\.(.+)", r"block.final_norm.\1"),
]


class OfficialCheckpointError(ValueError):
    """The file is not a reference checkpoint dive can represent; the message says why."""


def read_checkpoint(path) -> dict:
    """The reference's checkpoint dictionary, loaded weights-only (tensors, plain containers
    and argparse.Namespace; nothing in the file is executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise OfficialCheckpointError(
            f"{path}: not loadable weights-only (only tensors, containers and the options' "
            f"argparse.Namespace are allowed): {exc}") from None
    except Exception as exc:  # a corrupt file fails anywhere in the unpickler (KeyError, ...)
        raise OfficialCheckpointError(f"{path}: not a torch checkpoint "
                                      f"({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or "model" not in data or "args" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise OfficialCheckpointError(f"{path}: expected the reference's {{'args', 'model', "
                                      f"'epoch', 'best_score'}} dictionary, got {keys}")
    if not isinstance(data["args"], argparse.Namespace):
        raise OfficialCheckpointError(f"{path}: 'args' must be the options Namespace, got "
                                      f"{type(data['args']).__name__}")
    if not isinstance(data["model"], dict):
        raise OfficialCheckpointError(f"{path}: 'model' must be a state dict")
    return data


def _opt(args, name, default=None):
    return getattr(args, name, default)


def _require(args, name, wanted, why):
    value = _opt(args, name)
    if value != wanted:
        raise OfficialCheckpointError(f"option {name}={value!r} is not supported (dive needs "
                                      f"{wanted!r}: {why})")


def config_from_options(args, *, padding: str = "official", bert_path: Optional[str] = None):
    """The dive `Config` (model, loss, train) of the reference's stored options; raises
    OfficialCheckpointError naming the first option whose architecture dive lacks."""
    from ..config import Config, TrainConfig
    from ..losses import LossConfig

    data = _opt(args, "data_name", "")
    embed, k_img, ff_mult = _check_block(args)
    text, word_positions, image, arch = _encoders(args, data)
    block_norm = "post" if _opt(args, "spm_post_norm") else (
        "pre_final" if _opt(args, "spm_last_ln") else "pre")
    model = ModelConfig(
        image_encoder=image, text_encoder=text, embed_dim=embed, num_slots=k_img,
        region_dim=2048, word_dim=_opt(args, "word_dim", 300), depth=_opt(args, "spm_depth", 1),
        heads=4, head_dim=512, ff_mult=ff_mult, dropout=float(_opt(args, "dropout", 0.0)),
        share_weights=bool(_opt(args, "spm_weight_sharing")),
        slot_init="gaussian" if _opt(args, "query_slot") else "learned",
        resnet_arch=arch, image_size=_opt(args, "crop_size", 512) if image == "resnet" else 512,
        bert_path=bert_path, block_norm=block_norm, word_positions=word_positions,
        global_fc=bool(_opt(args, "img_res_last_fc")),
        projection_dropout=float(_opt(args, "img_1x1_dropout", 0.0)), padding=padding)
    hardest = bool(_opt(args, "max_violation"))
    loss = LossConfig(margin=float(_opt(args, "margin", 0.2)),
                      temperature=float(_opt(args, "temperature", 16.0)),
                      mmd_weight=float(_opt(args, "mmd_weight", 0.0)),
                      uniformity_weight=float(_opt(args, "unif_weight", 0.0)),
                      hardest=hardest, reduction="mean" if hardest else "triplets")
    train = TrainConfig(
        epochs=_opt(args, "num_epochs", 80), batch_size=_opt(args, "batch_size", 200),
        lr=float(_opt(args, "lr", 1e-3)),
        spm_lr_scale=float(_opt(args, "img_pie_lr_scale", 0.1)),
        weight_decay=float(_opt(args, "weight_decay", 1e-4)),
        grad_clip=float(_opt(args, "grad_clip", 1.0)),
        warm_epochs=max(0, int(_opt(args, "warm_epoch", 0))),
        caption_drop=float(_opt(args, "caption_drop_prob", 0.0)),
        region_drop=float(_opt(args, "butd_drop_prob", 0.0)), val_images=1000)
    return Config(model=model, loss=loss, train=train)


def _check_block(args):
    """(embed_size, K, feed-forward multiplier) of the reference's set prediction module;
    OfficialCheckpointError naming the first option whose architecture dive lacks."""
    _require(args, "arch", "slot", "DivE's slot-attention set prediction module")
    for name, why in (("gpo_1x1", "the projection with its MLP"),
                      ("spm_residual", "the global-feature residual"),
                      ("spm_residual_norm", "the LayerNorm on the global feature"),
                      ("spm_pre_norm", "pre-norm rounds"),
                      ("img_res_first_fc", "the global feature from the projected regions")):
        _require(args, name, True, why)
    for name, why in (("spm_residual_fc", "no linear after the residual"),
                      ("img_res_first_pool", "pooling after the projection"),
                      ("img_res_last_pool", "pooling after the projection"),
                      ("txt_pooling_fc", "no linear on the text global feature"),
                      ("sep_bert_fc", "one BERT projection")):
        if _opt(args, name):
            raise OfficialCheckpointError(f"option {name}=True is not supported ({why})")
    _require(args, "img_res_pool", "max", "max-pooled global image feature")
    _require(args, "spm_activation", "gelu", "GELU feed-forward")
    _require(args, "spm_img_pos_enc_type", "none", "no positions on image tokens")
    embed = _opt(args, "embed_size", 1024)
    for name in ("spm_input_dim", "spm_query_dim"):
        if _opt(args, name, embed) != embed:
            raise OfficialCheckpointError(f"option {name}={_opt(args, name)} must equal "
                                          f"embed_size={embed} (dive's set dimension)")
    k_img, k_txt = _opt(args, "img_num_embeds", 1), _opt(args, "txt_num_embeds", 1)
    if k_img != k_txt:
        raise OfficialCheckpointError(f"img_num_embeds={k_img} and txt_num_embeds={k_txt} "
                                      "differ; dive uses one K for both")
    ff_mult = float(_opt(args, "spm_ff_mult", 2))
    if ff_mult != int(ff_mult):
        raise OfficialCheckpointError(f"spm_ff_mult={ff_mult} must be a whole number")
    return embed, k_img, int(ff_mult)


def _encoders(args, data: str):
    """(text encoder, word positions, image encoder, CNN) of the reference's options."""
    if _opt(args, "use_bert"):
        text, word_positions = "bert", "index"
        _require(args, "txt_pooling", "cls", "the [CLS] global feature")
        _require(args, "spm_txt_pos_enc_type", "none", "no positions on BERT tokens")
    else:
        text = "bigru"
        _require(args, "gpo_rnn", True, "a bi-GRU of hidden size D, directions averaged")
        _require(args, "txt_pooling", "rnn", "the GRU's final state as global feature")
        _require(args, "txt_attention_input", "wemb", "slots over the word embeddings")
        _require(args, "spm_txt_pos_enc_type", "sine", "sine word positions")
        word_positions = "normalized"
    if "butd" in data:
        image, arch = "regions", "resnet152"
    elif data in ("coco", "f30k"):
        image, arch = "resnet", _opt(args, "cnn_type", "resnet152")
    else:
        raise OfficialCheckpointError(f"data_name={data!r} is not one of coco, f30k, coco_butd, "
                                      "f30k_butd")
    return text, word_positions, image, arch


def _rename(key: str, resnet: bool) -> Optional[str]:
    """The dive name of one official key (None: no counterpart)."""
    if key.startswith("img_enc."):
        rest = key[len("img_enc."):]
        if rest.startswith("cnn."):
            child, _, tail = rest[len("cnn."):].partition(".")
            if not resnet or child not in _RESNET_CHILDREN:
                return None
            return f"image_encoder.backbone.{_RESNET_CHILDREN[child]}.{tail}"
        base = "image_encoder.regions." if resnet else "image_encoder."
        for pattern, target in ((r"fc\.(weight|bias)", r"project.fc.\1"),
                                (r"mlp\.fc1\.(.+)", r"project.mlp_in.\1"),
                                (r"mlp\.bn\.bn\.(.+)", r"project.bn.\1"),
                                (r"mlp\.fc2\.(.+)", r"project.mlp_out.\1"),
                                (r"residual_last_fc\.(.+)", r"global_fc.\1")):
            if re.fullmatch(pattern, rest):
                return base + re.sub(pattern, target, rest)
        if rest.startswith("spm."):
            return _rename_spm(rest[len("spm."):], base + "head.spm.")
        return None
    if key.startswith("txt_enc."):
        rest = key[len("txt_enc."):]
        for pattern, target in ((r"embed\.weight", "embed.weight"),
                                (r"rnn\.(.+)", r"gru.\1"),
                                (r"bert\.(.+)", r"bert.\1"),
                                (r"linear\.(.+)", r"project.\1")):
            if re.fullmatch(pattern, rest):
                return "text_encoder." + re.sub(pattern, target, rest)
        if rest.startswith("spm."):
            return _rename_spm(rest[len("spm."):], "text_encoder.head.spm.")
    return None


def _rename_spm(rest: str, base: str) -> Optional[str]:
    for pattern, target in _SPM_RULES:
        if re.fullmatch(pattern, rest):
            return base + re.sub(pattern, target, rest)
    return None


def map_state_dict(official: dict, target: dict, *, resnet: bool = False) -> dict:
    """`official` tensors under the names and shapes of `target` (a dive state dict).

    Raises OfficialCheckpointError listing every official key without a dive counterpart,
    every dive key the file does not provide, and every shape mismatch. BERT's
    `embeddings.position_ids` buffer (saved by older transformers) is dropped when the dive
    model has none. The Gaussian slot parameters (1, 1, D) become (1, D).
    """
    official = {(k[len("module."):] if k.startswith("module.") else k): v
                for k, v in official.items()}
    out, unmapped, mismatched = {}, [], []
    for key, value in official.items():
        name = _rename(key, resnet)
        if name is None or name not in target:
            if key.endswith("bert.embeddings.position_ids") and name is not None:
                continue
            unmapped.append(key)
            continue
        if not isinstance(value, torch.Tensor):
            mismatched.append(f"{key}: not a tensor ({type(value).__name__})")
            continue
        want = target[name].shape
        if value.shape != want:
            if name.endswith(("slot_mean", "slot_log_sigma")) and value.numel() == want.numel():
                value = value.reshape(want)
            else:
                mismatched.append(f"{key} {tuple(value.shape)} -> {name} {tuple(want)}")
                continue
        out[name] = value.to(target[name].dtype)
    missing = sorted(set(target) - set(out))
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} official keys have no dive counterpart: "
                        f"{sorted(unmapped)}")
    if missing:
        problems.append(f"{len(missing)} dive keys are missing from the file: {missing}")
    if mismatched:
        problems.append(f"{len(mismatched)} shapes differ: {mismatched}")
    if problems:
        raise OfficialCheckpointError("the official state dict does not map onto the dive "
                                      "model: " + "; ".join(problems))
    return out


class _VocabularyStub:
    """What the reference's pickled `vocab.Vocabulary` becomes: its attributes, nothing run."""


class _VocabUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name == "Vocabulary":
            return _VocabularyStub
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a vocabulary file "
                                     "(only the reference's Vocabulary class is)")


def read_vocabulary(path):
    """A dive Vocabulary from the reference's vocabulary: its pickle (vocab/*_vocab.pkl, read
    by an unpickler that admits only its Vocabulary class, as an inert attribute holder) or
    its JSON; "<mask>" appended when missing, as the reference's train.py does."""
    from ..data.vocab import MASK, Vocabulary
    path = Path(path)
    if path.suffix != ".pkl":
        vocab = Vocabulary.load(path)
        words = list(vocab.words)
    else:
        try:
            with open(path, "rb") as fh:
                obj = _VocabUnpickler(fh).load()
        except (pickle.UnpicklingError, EOFError, AttributeError) as exc:
            raise ValueError(f"vocabulary file {path}: {exc}") from None
        idx2word = getattr(obj, "idx2word", None)
        if not isinstance(idx2word, dict):
            raise ValueError(f"vocabulary file {path}: no idx2word map")
        try:
            words = [idx2word[i] for i in range(len(idx2word))]
        except KeyError as exc:
            raise ValueError(f"vocabulary file {path}: ids are not 0..{len(idx2word) - 1} "
                             f"(missing {exc})") from None
    if MASK not in words:
        words.append(MASK)
    return Vocabulary(words)


def load_official(path, *, vocab=None, bert_path=None, padding: str = "official"):
    """(model, config, tokens) from a reference checkpoint: the dive DivE (eval mode, CPU) with
    every tensor of the file, its `Config`, and the caption tokenizer (the Vocabulary from
    `vocab`, the reference's vocabulary file, for the bi-GRU; BERT's tokenizer from
    `bert_path`, a local model directory, for the BERT setting).

    padding "official" (default) evaluates as the reference code does (padded words take 1/K
    of each slot's attention, so a caption's set depends on its batch's padded length);
    "exact" is dive's masking.
    """
    from .dive import DivE
    from .text import load_bert_tokens
    data = read_checkpoint(path)
    config = config_from_options(data["args"], padding=padding, bert_path=bert_path)
    if config.model.text_encoder == "bert":
        if not bert_path:
            raise ValueError("a BERT checkpoint needs bert_path: a local bert-base-uncased "
                             "directory (its weights are replaced by the checkpoint's)")
        tokens = load_bert_tokens(bert_path)
        model = DivE(config.model)
    else:
        if vocab is None:
            raise ValueError("a bi-GRU checkpoint needs its vocabulary: the reference's "
                             "vocab/<data_name>_vocab.pkl (or .json)")
        tokens = vocab if not isinstance(vocab, (str, Path)) else read_vocabulary(vocab)
        rows = _embedding_rows(data["model"])
        if rows is not None and rows != len(tokens):
            raise ValueError(f"the vocabulary has {len(tokens)} words (with <mask>) but the "
                             f"checkpoint's word embedding has {rows} rows")
        model = DivE(config.model, tokens)
    state = map_state_dict(data["model"], model.state_dict(),
                           resnet=config.model.image_encoder == "resnet")
    model.load_state_dict(state)
    return model.eval(), config, tokens


def _embedding_rows(state):
    for key in ("txt_enc.embed.weight", "module.txt_enc.embed.weight"):
        if key in state and isinstance(state[key], torch.Tensor):
            return state[key].shape[0]
    return None


def convert_official(path, out_dir, *, vocab=None, bert_path=None,
                     padding: str = "official") -> Path:
    """Write a dive run folder from a reference checkpoint: config.json, vocab.json (bi-GRU)
    and best.pt ({"config", "model", "epoch", "official"}), which `dive evaluate --checkpoint
    OUT_DIR/best.pt` reads. Returns the path of best.pt; refuses a folder that holds a run."""
    out = Path(out_dir)
    if (out / "best.pt").exists() or (out / "last.pt").exists():
        raise FileExistsError(f"{out} already holds a run; choose another output folder")
    model, config, tokens = load_official(path, vocab=vocab, bert_path=bert_path,
                                          padding=padding)
    data = read_checkpoint(path)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.json")
    if config.model.text_encoder == "bigru":
        tokens.save(out / "vocab.json")
    epoch = data.get("epoch")
    best = data.get("best_score")
    torch.save({"config": config.to_dict(), "model": model.state_dict(),
                "epoch": int(epoch) + 1 if isinstance(epoch, int) else None,
                "official": {"file": str(Path(path).resolve()),
                             "epoch": epoch if isinstance(epoch, int) else None,
                             "best_score": (float(best) if isinstance(best, (int, float))
                                            and math.isfinite(best) else None)}},
               out / "best.pt")
    return out / "best.pt"


__all__ = ["OfficialCheckpointError", "config_from_options", "convert_official",
           "load_official", "map_state_dict", "read_checkpoint", "read_vocabulary"]
