"""Metric tables for the command line, and the chance level beside them."""
import math

KS = (1, 5, 10)


def chance_recalls(images, captions_per_image):
    """R@K (percent) of a random ranking: i2t finds one of cpi captions, t2i the one image."""
    captions = images * captions_per_image

    def i2t(k):
        miss = math.prod((captions - captions_per_image - i) / (captions - i)
                         for i in range(min(k, captions)))
        return 100.0 * (1 - miss)

    return {"i2t": {f"r{k}": i2t(k) for k in KS},
            "t2i": {f"r{k}": 100.0 * min(k, images) / images for k in KS}}


def print_recall_table(title, metrics, chance=None):
    print(f"{title:<26}" + "".join(f"{f'R@{k}':>8}" for k in KS) + f"{'medr':>8}{'meanr':>9}")
    for d in ("i2t", "t2i"):
        m = metrics[d]
        print(f"  {d:<24}" + "".join(f"{m[f'r{k}']:8.2f}" for k in KS)
              + f"{m['medr']:8.0f}{m['meanr']:9.1f}")
    if chance:
        for d in ("i2t", "t2i"):
            print(f"  {d + ' chance':<24}" + "".join(f"{chance[d][f'r{k}']:8.2f}" for k in KS))
    line = f"  RSUM {metrics['rsum']:.2f}"
    if chance:
        line += f"   (chance {sum(chance[d][f'r{k}'] for d in ('i2t', 't2i') for k in KS):.2f})"
    print(line)


def print_eccv_table(metrics):
    rows = [("ECCV mAP@R", "eccv_map_at_r"), ("ECCV R-Precision", "eccv_rprecision"),
            ("ECCV R@1", "eccv_r1")]
    rows += [(f"{label} R@{k}", f"{key}_r{k}") for label, key in
             (("CxC", "cxc"), ("COCO 1K", "coco_1k"), ("COCO 5K", "coco_5k")) for k in KS]
    print(f"{'metric (%)':<26}{'i2t':>8}{'t2i':>8}")
    for label, key in rows:
        print(f"  {label:<24}{100 * metrics[key]['i2t']:8.2f}{100 * metrics[key]['t2i']:8.2f}")
