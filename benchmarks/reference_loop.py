"""The honest baseline: a plain hand-written training loop, no sweepcls code. Every sweepcls recipe on the hard
benchmark must beat it under the same epoch budget.

Usage:
    python -m datasets.digits --export /tmp/hard --hard
    python benchmarks/reference_loop.py --data /tmp/hard --answers /tmp/hard.answers.csv --epochs 15 --seed 0
What a competent competitor writes on day one: timm resnet18 at 64 px, an albumentations pipeline imitating the
test noise (turns, flips, rotation, colour, blur, Gaussian noise, JPEG), AdamW + OneCycle, cross entropy.
"""
import argparse
import csv
import time
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import timm
import torch
from albumentations.pytorch import ToTensorV2
from sklearn.metrics import f1_score

p = argparse.ArgumentParser()
p.add_argument("--data", required=True, help="a competition folder (train.csv, train/, test/)")
p.add_argument("--answers", default="", help="the test labels (id,target): the submission is scored")
p.add_argument("--epochs", type=int, default=15, help="training epochs")
p.add_argument("--seed", type=int, default=0, help="torch and numpy seed")
p.add_argument("--model", default="resnet18", help="timm model name")
p.add_argument("--img_size", type=int, default=64, help="square input size, px")
p.add_argument("--out", default="", help="where to write the submission CSV")
args = p.parse_args()
torch.manual_seed(args.seed)
np.random.seed(args.seed)
root, start = Path(args.data), time.perf_counter()

rows = list(csv.DictReader(open(root / "train.csv")))
classes = sorted({r["target"] for r in rows})
read = lambda path: cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
train_x = [read(root / "train" / r["ID"]) for r in rows]
train_y = [classes.index(r["target"]) for r in rows]
test_ids = [r["ID"] for r in csv.DictReader(open(root / "sample_submission.csv"))]
test_x = [read(root / "test" / i) for i in test_ids]

norm = [A.Normalize(), ToTensorV2()]  # ImageNet mean/std
train_tf = A.Compose([
    A.Resize(args.img_size, args.img_size), A.RandomRotate90(), A.HorizontalFlip(),
    A.Rotate(limit=20, border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.7),
    A.RGBShift(40, 40, 40, p=0.5), A.RandomBrightnessContrast(p=0.5), A.GaussianBlur(sigma_limit=(0.1, 1.5), p=0.3),
    A.GaussNoise(std_range=(0.05, 0.25), p=0.6), A.ImageCompression(quality_range=(30, 90), p=0.3), *norm],
    seed=args.seed)
test_tf = A.Compose([A.Resize(args.img_size, args.img_size), *norm])


class Images(torch.utils.data.Dataset):
    def __init__(self, x, y, tf):
        self.x, self.y, self.tf = x, y, tf

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.tf(image=self.x[i])["image"], self.y[i]


train_dl = torch.utils.data.DataLoader(Images(train_x, train_y, train_tf), batch_size=64, shuffle=True, drop_last=True)
test_dl = torch.utils.data.DataLoader(Images(test_x, [0] * len(test_x), test_tf), batch_size=256)
model = timm.create_model(args.model, num_classes=len(classes))
opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.epochs * len(train_dl))
for epoch in range(args.epochs):
    model.train()
    for x, y in train_dl:
        loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    print(f"epoch {epoch + 1} loss {loss.item():.3f}")

model.eval()
with torch.no_grad():
    pred = torch.cat([model(x).argmax(1) for x, _ in test_dl]).numpy()
out = Path(args.out or root.with_name(root.name + ".reference_submission.csv"))
with open(out, "w", newline="") as fh:
    csv.writer(fh).writerows([["ID", "target"], *[[i, classes[k]] for i, k in zip(test_ids, pred)]])
line = (f"reference loop: {args.model} {args.img_size}px {args.epochs} epochs seed {args.seed}: "
        f"{time.perf_counter() - start:.0f}s")
if args.answers:
    truth = {r["ID"]: r["target"] for r in csv.DictReader(open(args.answers))}
    line += f", test macro-F1 {f1_score([truth[i] for i in test_ids], [classes[k] for k in pred], average='macro'):.4f}"
print(line + f", wrote {out}")
