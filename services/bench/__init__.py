"""`dpserve bench`: a serving benchmark client after SGLang's bench_serving."""
