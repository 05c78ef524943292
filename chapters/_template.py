# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # NN · Chapter title
#
# *Template. Copy to `chapters/NN_topic.py`, pair with `jupytext --set-formats ipynb,py:percent`,
# and keep the six sections below in this order.*
#
# ## Aim
# One paragraph: what the learner will be able to do and measure after this chapter.

# %%
# Set-up cell: every chapter starts like this. Sizes come from the budget, never literals.
import torch

from boltzlab.config import budget, sizes

SEED = 0
torch.manual_seed(SEED)
S = sizes("00")  # this chapter's sizes under BOLTZLAB_BUDGET (smoke / laptop / full)
print(f"budget: {budget()}")

# %% [markdown]
# ## Theory
# The maths, with the equations the code below implements, e.g. $p(x) \propto e^{-E(x)/kT}$.

# %% [markdown]
# ## Practice
# Code that calls `boltzlab`, plots that show the claim, and at least one widget where
# exploring a parameter teaches something. Every claim in the text is a number or a plot
# produced here. Logic two chapters need lives in the package, not in the notebook.

# %%
# A check cell: real checks are asserts, so a broken result fails the notebook tests.
assert S is not None

# %% [markdown]
# ## Discussion
# What goes wrong, and how you would notice (which metric, which plot).
#
# ## Summary
# - three to five bullet points
#
# ## Exercises
# Open `exercises/NN_name.ipynb` (solutions are for instructors). Each exercise has a check
# cell that tells you what is wrong.
