"""Flow-GRPO-style RL fine-tuning of Stable Diffusion 3.5 Medium: rewards, prompt sets and a tiny test pipeline."""
