"""Hugging Face interop: conversion to/from HF checkpoints and the Victor LLaVA transformers model."""
