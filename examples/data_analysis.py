"""The data-analysis example: write a CSV inside the VM, group and sum it with pandas."""

import csv

import pandas as pd

rows = [
    ("north", "widgets", 120),
    ("south", "widgets", 80),
    ("north", "gadgets", 45),
    ("south", "gadgets", 60),
    ("north", "widgets", 30),
]
with open("/tmp/sales.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["region", "product", "units"])
    writer.writerows(rows)

df = pd.read_csv("/tmp/sales.csv")
totals = df.groupby("region")["units"].sum()
print(totals.to_string())
print("total units:", int(df["units"].sum()))
