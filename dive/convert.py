"""`dive convert-official CKPT OUT_DIR`: a reference checkpoint (kdwonn/DivE) as a dive run."""
from .models.official import convert_official, read_checkpoint


def add_parser(sub):
    c = sub.add_parser("convert-official", help="a checkpoint of the reference code "
                       "(kdwonn/DivE ckpt.pth.tar) -> a dive run folder for dive evaluate")
    c.add_argument("checkpoint", metavar="CKPT")
    c.add_argument("out", metavar="OUT_DIR")
    c.add_argument("--vocab", help="the reference's vocabulary (vocab/<data_name>_vocab.pkl "
                   "or .json); needed for bi-GRU checkpoints")
    c.add_argument("--bert-path", help="local bert-base-uncased directory (BERT checkpoints)")
    c.add_argument("--exact-padding", action="store_true",
                   help="dive's exact masking of padded words instead of the reference's "
                   "arithmetic (the converted model then differs from the reference's numbers)")
    c.set_defaults(run=run_convert)


def run_convert(args):
    path = convert_official(args.checkpoint, args.out, vocab=args.vocab,
                            bert_path=args.bert_path,
                            padding="exact" if args.exact_padding else "official")
    options = read_checkpoint(args.checkpoint)["args"]
    print(f"converted {args.checkpoint} ({getattr(options, 'data_name', '?')}, "
          f"{getattr(options, 'remark', None) or 'no remark'}) -> {path}")
    print(f"evaluate: dive evaluate --checkpoint {path} --data DATA --split testall --eccv")
