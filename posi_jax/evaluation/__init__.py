"""The evaluation harness: prompt sets, images (local SD or an images API), scoring, reports, the resumable run."""
