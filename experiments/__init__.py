"""The paper's ablations at small scale (issue 11), one script each; `harness` holds what they share."""
