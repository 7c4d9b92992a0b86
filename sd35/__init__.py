"""Flow-GRPO-style RL fine-tuning of Stable Diffusion 3.5 Medium: rewards, prompt sets and a tiny test pipeline."""
import logging

# diffusers' SD3 pipeline imports transformers' image processors for IP-adapters, which we never
# use; without torchvision transformers warns that it falls back to the PIL ones, which nobody
# can act on (torchvision does not install beside this torch). Every sd35 module imports this
# package first, so the filter is in place before diffusers loads.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())
