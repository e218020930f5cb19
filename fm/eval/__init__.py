"""Evaluation: scoring trained models (multiple choice by log-likelihood in choice.py)."""
