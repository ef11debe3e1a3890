"""Reference (kdwonn/DivE) checkpoints: a file laid out as its train.py saves one, written here
from the key names and shapes documented in dive.models.official, loads into dive, computes
what the reference's arithmetic gives (a hand-written float64 version below), converts to a run
folder `dive evaluate` reads, and every malformed file fails with a clear error."""
import argparse
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dive.cli import main
from dive.models import load_official
from dive.models.official import (_rename, config_from_options,
                                  convert_official, map_state_dict, read_vocabulary)
from dive.eval.model import load_for_eval

D, K, WORD, DEPTH, FF, REGION, HEADS, HEAD_DIM = 16, 3, 8, 2, 2, 2048, 4, 512
WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "red", "car", "on", "the"]


def script_options(**changes):
    """The options of the reference's train_eval_coco.sh, at test sizes."""
    opts = dict(
        data_name="coco_butd", cnn_type="resnet152", embed_size=D, word_dim=WORD, margin=0.2,
        max_violation=True, img_num_embeds=K, txt_num_embeds=K, mmd_weight=0.01,
        unif_weight=0.01, batch_size=200, warm_epoch=0, num_epochs=80, lr=1e-3,
        txt_lr_scale=1.0, img_pie_lr_scale=0.1, txt_pie_lr_scale=0.1, temperature=16.0,
        loss="smooth_chamfer", txt_pooling="rnn", arch="slot", txt_attention_input="wemb",
        spm_img_pos_enc_type="none", spm_txt_pos_enc_type="sine", spm_1x1=True,
        spm_residual=True, spm_residual_norm=True, spm_residual_activation="none",
        spm_activation="gelu", spm_ff_mult=float(FF), spm_last_ln=True, img_res_pool="max",
        img_res_first_fc=True, img_res_last_fc=False, spm_input_dim=D, spm_query_dim=D,
        spm_depth=DEPTH, spm_weight_sharing=True, res_only_norm=True, img_1x1_dropout=0.1,
        spm_pre_norm=True, spm_post_norm=False, gpo_1x1=True, gpo_rnn=True,
        weight_decay=1e-4, grad_clip=1.0, dropout=0.1, caption_drop_prob=0.2,
        butd_drop_prob=0.2, query_slot=False, use_bert=False, spm_residual_fc=False,
        img_res_first_pool=False, img_res_last_pool=False, txt_pooling_fc=False,
        sep_bert_fc=False, crop_size=224, remark="coco_butd_bigru")
    opts.update(changes)
    return argparse.Namespace(**opts)


def official_state(opts, vocab_size=len(WORDS) + 1, gen=None):
    """Random tensors under the reference's key names and shapes (see dive.models.official)."""
    gen = gen or torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.3  # noqa: E731
    inner = HEADS * HEAD_DIM
    s = {"img_enc.fc.weight": r(D, REGION) * 0.05, "img_enc.fc.bias": r(D),
         "img_enc.mlp.fc1.weight": r(D // 2, D), "img_enc.mlp.fc1.bias": r(D // 2),
         "img_enc.mlp.bn.bn.weight": 1 + r(D // 2), "img_enc.mlp.bn.bn.bias": r(D // 2),
         "img_enc.mlp.bn.bn.running_mean": r(D // 2),
         "img_enc.mlp.bn.bn.running_var": 1 + r(D // 2).abs(),
         "img_enc.mlp.bn.bn.num_batches_tracked": torch.tensor(7),
         "img_enc.mlp.fc2.weight": r(D, D // 2), "img_enc.mlp.fc2.bias": r(D),
         "txt_enc.embed.weight": r(vocab_size, WORD)}
    for suffix in ("", "_reverse"):
        s[f"txt_enc.rnn.weight_ih_l0{suffix}"] = r(3 * D, WORD)
        s[f"txt_enc.rnn.weight_hh_l0{suffix}"] = r(3 * D, D)
        s[f"txt_enc.rnn.bias_ih_l0{suffix}"] = r(3 * D)
        s[f"txt_enc.rnn.bias_hh_l0{suffix}"] = r(3 * D)
    if opts.img_res_last_fc:
        s["img_enc.residual_last_fc.weight"], s["img_enc.residual_last_fc.bias"] = r(D, D), r(D)
    for enc, token_dim in (("img_enc", D), ("txt_enc", WORD)):
        p = f"{enc}.spm."
        s[p + "residual_norm.weight"], s[p + "residual_norm.bias"] = 1 + r(D), r(D)
        if opts.query_slot:
            s[p + "agg_block.slots_mu"], s[p + "agg_block.slots_log_sigma"] = r(1, 1, D), r(1, 1, D)
        else:
            s[p + "agg_block.latents"] = r(K, D) * 3
        shared = {}
        for i in range(opts.spm_depth):
            a = f"{p}agg_block.layers.{i}."
            layer = shared if opts.spm_weight_sharing and shared else {
                "0.norm.weight": 1 + r(D), "0.norm.bias": r(D),
                "0.norm_context.weight": 1 + r(token_dim), "0.norm_context.bias": r(token_dim),
                "0.fn.to_q.weight": r(inner, D), "0.fn.to_k.weight": r(inner, token_dim),
                "0.fn.to_v.weight": r(inner, token_dim) * 0.2,
                "0.fn.to_out.0.weight": r(D, inner) * 0.05, "0.fn.to_out.0.bias": r(D),
                "2.norm.weight": 1 + r(D), "2.norm.bias": r(D),
                "2.fn.net.0.weight": r(FF * D, D), "2.fn.net.0.bias": r(FF * D),
                "2.fn.net.3.weight": r(D, FF * D), "2.fn.net.3.bias": r(D)}
            if opts.spm_weight_sharing:
                shared = layer
            s.update({a + k: v for k, v in layer.items()})
            if opts.spm_post_norm:
                for j in (1, 3):
                    s[f"{a}{j}.norm.weight"], s[f"{a}{j}.norm.bias"] = 1 + r(D), r(D)
        if opts.spm_last_ln and not opts.spm_post_norm:
            s[p + "agg_block.last_layer.0.weight"] = 1 + r(D)
            s[p + "agg_block.last_layer.0.bias"] = r(D)
    return s


def save_checkpoint(path, opts=None, state=None, **extra):
    opts = opts or script_options()
    torch.save({"args": opts, "epoch": 41, "best_score": 512.5,
                "model": official_state(opts) if state is None else state, **extra}, path)
    return path


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text('{"word2idx": {}, "idx2word": {%s}, "idx": %d}' % (
        ", ".join(f'"{i}": "{w}"' for i, w in enumerate(WORDS)), len(WORDS)))
    return path


# ----------------------------------------------------------------------------- the reference's
# arithmetic, written from its description (float64, eval mode)


def ln(x, s, p):
    return F.layer_norm(x, x.shape[-1:], s[p + "weight"], s[p + "bias"], 1e-5)


def reference_block(s, p, tokens, pad, opts):
    """Slots over tokens: pre-norm rounds, padded tokens' logits set to the same value for every
    slot (softmax over slots), positions (1..L)/(L+1e-6)*2pi on the keys of words."""
    b, n, c = tokens.shape
    slots = s[p + "agg_block.latents"].expand(b, -1, -1)
    pos = 0
    if p.startswith("txt"):
        y = torch.arange(1, n + 1, dtype=torch.float64) / (n + 1e-6) * 2 * math.pi
        rate = 10000 ** (2 * (torch.arange(c, dtype=torch.float64) // 2) / c)
        arg = y[:, None] / rate
        pos = torch.where(torch.arange(c) % 2 == 0, arg.sin(), arg.cos())
    for i in range(opts.spm_depth):
        a = f"{p}agg_block.layers.{i}."
        ctx = ln(tokens, s, a + "0.norm_context.")
        q = ln(slots, s, a + "0.norm.") @ s[a + "0.fn.to_q.weight"].T
        k, v = (ctx + pos) @ s[a + "0.fn.to_k.weight"].T, ctx @ s[a + "0.fn.to_v.weight"].T
        heads = lambda t: t.view(b, t.shape[1], HEADS, HEAD_DIM).transpose(1, 2)  # noqa: E731
        logits = heads(q) @ heads(k).transpose(-1, -2) * HEAD_DIM ** -0.5
        logits = logits.masked_fill(pad[:, None, None, :], -torch.finfo(torch.float64).max)
        attn = logits.softmax(dim=2)
        attn = attn / (attn.sum(-1, keepdim=True) + 1e-7)
        out = (attn @ heads(v)).transpose(1, 2).reshape(b, K, -1)
        slots = slots + out @ s[a + "0.fn.to_out.0.weight"].T + s[a + "0.fn.to_out.0.bias"]
        hidden = F.gelu(ln(slots, s, a + "2.norm.") @ s[a + "2.fn.net.0.weight"].T
                        + s[a + "2.fn.net.0.bias"])
        slots = slots + hidden @ s[a + "2.fn.net.3.weight"].T + s[a + "2.fn.net.3.bias"]
    return ln(slots, s, p + "agg_block.last_layer.0.")


def reference_images(s, regions, lengths, opts):
    base = regions @ s["img_enc.fc.weight"].T + s["img_enc.fc.bias"]
    h = base @ s["img_enc.mlp.fc1.weight"].T + s["img_enc.mlp.fc1.bias"]
    bn = "img_enc.mlp.bn.bn."
    h = (h - s[bn + "running_mean"]) / (s[bn + "running_var"] + 1e-5).sqrt() * s[bn + "weight"] \
        + s[bn + "bias"]
    local = base + torch.relu(h) @ s["img_enc.mlp.fc2.weight"].T + s["img_enc.mlp.fc2.bias"]
    pad = torch.arange(regions.shape[1])[None] >= lengths[:, None]
    glob = local.masked_fill(pad[..., None], -torch.finfo(torch.float64).max).max(1).values
    slots = reference_block(s, "img_enc.spm.", local, pad, opts)
    return F.normalize(ln(glob, s, "img_enc.spm.residual_norm.")[:, None] + slots, dim=-1)


def reference_captions(s, ids, lengths, opts):
    wemb = s["txt_enc.embed.weight"][ids]
    gru = torch.nn.GRU(WORD, D, batch_first=True, bidirectional=True).double()
    gru.load_state_dict({k[len("txt_enc.rnn."):]: v for k, v in s.items()
                         if k.startswith("txt_enc.rnn.")})
    packed = torch.nn.utils.rnn.pack_padded_sequence(wemb, lengths, batch_first=True,
                                                     enforce_sorted=False)
    glob = gru(packed)[1].mean(0)
    pad = torch.arange(ids.shape[1])[None] >= lengths[:, None]
    slots = reference_block(s, "txt_enc.spm.", wemb, pad, opts)
    return F.normalize(ln(glob, s, "txt_enc.spm.residual_norm.")[:, None] + slots, dim=-1)


def inputs(gen):
    regions = torch.randn(3, 5, REGION, generator=gen, dtype=torch.float64)
    region_lengths = torch.tensor([5, 3, 4])
    regions[1, 3:] = 0
    regions[2, 4:] = 0
    ids = torch.randint(4, len(WORDS), (3, 6), generator=gen)
    word_lengths = torch.tensor([6, 2, 4])
    ids[torch.arange(6)[None] >= word_lengths[:, None]] = 0
    return regions, region_lengths, ids, word_lengths


def masks(regions, region_lengths, ids, word_lengths):
    return (torch.arange(regions.shape[1])[None] < region_lengths[:, None],
            torch.arange(ids.shape[1])[None] < word_lengths[:, None])


def test_loaded_model_computes_the_reference_arithmetic(tmp_path, vocab_file):
    opts = script_options()
    path = save_checkpoint(tmp_path / "ckpt.pth.tar", opts)
    model, config, vocab = load_official(path, vocab=vocab_file)
    assert (config.model.block_norm, config.model.word_positions, config.model.global_fc,
            config.model.projection_dropout, config.model.padding) == (
                "pre_final", "normalized", False, 0.1, "official")
    assert len(vocab) == len(WORDS) + 1 and vocab.words[-1] == "<mask>"
    state = {k: v.double() if v.is_floating_point() else v
             for k, v in torch.load(path, weights_only=False)["model"].items()}
    model.double()
    regions, region_lengths, ids, word_lengths = inputs(torch.Generator().manual_seed(1))
    img_mask, cap_mask = masks(regions, region_lengths, ids, word_lengths)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(regions, img_mask),
                                   reference_images(state, regions, region_lengths, opts),
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.encode_captions(ids, cap_mask),
                                   reference_captions(state, ids, word_lengths, opts),
                                   rtol=1e-10, atol=1e-12)


def test_exact_padding_differs_only_where_there_is_padding(tmp_path, vocab_file):
    path = save_checkpoint(tmp_path / "ckpt.pth.tar")
    official, _, _ = load_official(path, vocab=vocab_file)
    exact, config, _ = load_official(path, vocab=vocab_file, padding="exact")
    assert config.model.padding == "exact"
    regions, region_lengths, ids, word_lengths = inputs(torch.Generator().manual_seed(2))
    img_mask, cap_mask = masks(regions, region_lengths, ids, word_lengths)
    with torch.no_grad():
        a = official.double().encode_captions(ids, cap_mask)
        b = exact.double().encode_captions(ids, cap_mask)
        torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)  # the unpadded caption
        assert (a[1] - b[1]).abs().max() > 1e-3
        a = official.encode_images(regions, img_mask)
        b = exact.encode_images(regions, img_mask)
        torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
        assert (a[1] - b[1]).abs().max() > 1e-3


def test_dataparallel_prefix_gaussian_slots_post_norm_and_global_fc(tmp_path, vocab_file):
    opts = script_options(query_slot=True, spm_post_norm=True, spm_last_ln=False,
                          img_res_last_fc=True, spm_weight_sharing=False)
    state = {"module." + k: v for k, v in official_state(opts).items()}
    path = save_checkpoint(tmp_path / "ckpt.pth.tar", opts, state)
    model, config, _ = load_official(path, vocab=vocab_file)
    m = config.model
    assert (m.slot_init, m.block_norm, m.global_fc, m.share_weights) == (
        "gaussian", "post", True, False)
    got = model.state_dict()
    torch.testing.assert_close(got["image_encoder.head.spm.block.slot_mean"],
                               state["module.img_enc.spm.agg_block.slots_mu"].view(1, D))
    torch.testing.assert_close(got["image_encoder.global_fc.weight"],
                               state["module.img_enc.residual_last_fc.weight"])
    torch.testing.assert_close(got["text_encoder.head.spm.block.ff_norms.1.weight"],
                               state["module.txt_enc.spm.agg_block.layers.1.3.norm.weight"])
    torch.testing.assert_close(got["text_encoder.head.spm.block.rounds.1.attention.to_k.weight"],
                               state["module.txt_enc.spm.agg_block.layers.1.0.fn.to_k.weight"])


def test_convert_writes_a_run_that_dive_evaluate_reads(tmp_path, vocab_file, capsys):
    path = save_checkpoint(tmp_path / "ckpt.pth.tar")
    out = tmp_path / "run"
    assert main(["convert-official", str(path), str(out), "--vocab", str(vocab_file)]) == 0
    assert "dive evaluate --checkpoint" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"config.json", "vocab.json", "best.pt"}
    model, _, config = load_for_eval(out / "best.pt", "cpu")
    direct, _, _ = load_official(path, vocab=vocab_file)
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert config.train.val_images == 1000 and config.loss.hardest
    # A SCAN-format split: 2 images of 36 x 2048 regions, 5 captions each.
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "test_ims.npy", np.random.default_rng(0).normal(size=(2, 36, 2048))
            .astype(np.float32))
    (data / "test_caps.txt").write_text("a red dog\n" * 5 + "the car on a car\n" * 5)
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(data),
                 "--split", "test", "--device", "cpu", "--quiet"]) == 0
    assert "RSUM" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="already holds a run"):
        convert_official(path, out, vocab=vocab_file)


def test_read_vocabulary_from_the_reference_pickle(tmp_path):
    class Vocabulary:  # the reference's vocab.Vocabulary: three attributes
        pass

    vocab = Vocabulary()
    vocab.idx, vocab.word2idx = len(WORDS), {w: i for i, w in enumerate(WORDS)}
    vocab.idx2word = dict(enumerate(WORDS))
    Vocabulary.__module__, Vocabulary.__qualname__ = __name__, "Vocabulary"
    globals()["Vocabulary"] = Vocabulary
    try:
        (tmp_path / "v.pkl").write_bytes(pickle.dumps(vocab))
    finally:
        del globals()["Vocabulary"]
    got = read_vocabulary(tmp_path / "v.pkl")
    assert list(got.words) == WORDS + ["<mask>"]
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(print))
    with pytest.raises(ValueError, match="builtins.print is not allowed"):
        read_vocabulary(tmp_path / "evil.pkl")


class Payload:
    def __reduce__(self):
        return (print, ("ran",))


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("not_torch", "not a torch checkpoint"),
    ("code", "not loadable weights-only"),
    ("no_args", r"expected the reference's \{'args'"),
    ("args_dict", "'args' must be the options Namespace"),
    ("extra_key", r"1 official keys have no dive counterpart: \['img_enc.spm.fc.weight'\]"),
    ("missing_key", r"1 dive keys are missing from the file: "
                    r"\['image_encoder.project.mlp_in.bias'\]"),
    ("shape", r"1 shapes differ: \['img_enc.mlp.fc2.bias \(17,\) -> "
              r"image_encoder.project.mlp_out.bias \(16,\)'\]"),
    ("vocab_size", "the vocabulary has 11 words"),
    ("no_vocab", "needs its vocabulary"),
    ("pvse", "option arch='pvse' is not supported"),
    ("k", "img_num_embeds=3 and txt_num_embeds=2 differ"),
    ("residual_fc", "option spm_residual_fc=True is not supported"),
    ("dims", "spm_input_dim=8 must equal embed_size=16"),
    ("ff", "spm_ff_mult=2.5 must be a whole number"),
    ("bert_path", "needs bert_path"),
])
def test_errors(tmp_path, vocab_file, case, match):
    path = tmp_path / "ckpt.pth.tar"
    vocab = vocab_file
    opts = script_options()
    state = official_state(opts)
    if case == "missing":
        path = tmp_path / "nothing.pth.tar"
    elif case == "not_torch":
        path.write_text("hello")
    elif case == "code":
        save_checkpoint(path, extra=Payload())
    elif case == "no_args":
        torch.save({"model": state}, path)
    elif case == "args_dict":
        torch.save({"args": vars(opts), "model": state}, path)
    elif case == "extra_key":
        save_checkpoint(path, opts, {**state, "img_enc.spm.fc.weight": torch.zeros(D, D)})
    elif case == "missing_key":
        del state["img_enc.mlp.fc1.bias"]
        save_checkpoint(path, opts, state)
    elif case == "shape":
        state["img_enc.mlp.fc2.bias"] = torch.zeros(17)
        save_checkpoint(path, opts, state)
    elif case == "vocab_size":
        save_checkpoint(path, opts, official_state(opts, vocab_size=12))
    elif case == "no_vocab":
        save_checkpoint(path, opts, state)
        vocab = None
    else:
        changes = {"pvse": dict(arch="pvse"), "k": dict(txt_num_embeds=2),
                   "residual_fc": dict(spm_residual_fc=True), "dims": dict(spm_input_dim=8),
                   "ff": dict(spm_ff_mult=2.5),
                   "bert_path": dict(use_bert=True, txt_pooling="cls",
                                     spm_txt_pos_enc_type="none")}[case]
        save_checkpoint(path, script_options(**changes), state)
    error = FileNotFoundError if case == "missing" else ValueError
    with pytest.raises(error, match=match):
        load_official(path, vocab=vocab)


def test_cli_reports_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["convert-official", str(tmp_path / "none.tar"), str(tmp_path / "out")])
    assert "does not exist" in capsys.readouterr().err


def test_resnet_and_bert_key_names():
    assert _rename("img_enc.cnn.layer1.0.conv1.weight", True) == \
        "image_encoder.backbone.4.0.conv1.weight"
    assert _rename("img_enc.cnn.bn1.running_mean", True) == "image_encoder.backbone.1.running_mean"
    assert _rename("img_enc.fc.weight", True) == "image_encoder.regions.project.fc.weight"
    assert _rename("img_enc.spm.agg_block.latents", True) == \
        "image_encoder.regions.head.spm.block.slots"
    assert _rename("img_enc.cnn.fc.weight", True) is None
    assert _rename("txt_enc.linear.weight", False) == "text_encoder.project.weight"
    assert _rename("txt_enc.bert.encoder.layer.0.output.dense.bias", False) == \
        "text_encoder.bert.encoder.layer.0.output.dense.bias"
    target = {"text_encoder.bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)}
    got = map_state_dict({"txt_enc.bert.embeddings.word_embeddings.weight": torch.ones(2, 2),
                          "txt_enc.bert.embeddings.position_ids": torch.arange(4)[None]},
                         target)
    assert list(got) == list(target)


def test_bert_options_give_the_bert_config():
    config = config_from_options(script_options(use_bert=True, txt_pooling="cls",
                                                spm_txt_pos_enc_type="none",
                                                data_name="f30k"), bert_path="/x")
    assert (config.model.text_encoder, config.model.image_encoder, config.model.resnet_arch,
            config.model.image_size, config.model.bert_path) == (
                "bert", "resnet", "resnet152", 224, "/x")
    loss = config_from_options(script_options(max_violation=False)).loss
    assert (loss.hardest, loss.reduction) == (False, "triplets")
