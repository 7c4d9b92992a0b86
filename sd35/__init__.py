"""Flow-GRPO-style RL fine-tuning of Stable Diffusion 3.5 Medium: rewards, prompt sets and a tiny test pipeline."""
import logging

# diffusers' SD3 pipeline imports transformers' image processors for IP-adapters, which we never use;
# without torchvision (which does not install beside this torch) transformers warns that it falls back
# to PIL, which nobody can act on. Every sd35 module imports this package first, before diffusers loads.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())
