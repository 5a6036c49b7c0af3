"""Whether OpenBLAS's Gram products give the same bits with 1, 2 and 4 threads (they do not): the reason
products inside an executor's evaluations keep one BLAS thread (``graphopt.measure.executor.single_core``).
Shapes of the re-fits' ``XᵀX`` / ``XᵀY``, float32 and float64; prints each product that differs and a count.

    python tools/blas_thread_bits.py
"""
import numpy as np
from graphopt.measure.blas import blas_threads
rng=np.random.default_rng(0)
bad=0; tot=0
for dt in (np.float32, np.float64):
  for r,f,o in [(1024,1153,64),(8192,577,129),(4096,1025,1025),(333,4609,100),(65538//8,2305,512),(5000,3073,768)]:
    x=rng.standard_normal((r,f)).astype(dt); y=rng.standard_normal((r,o)).astype(dt)
    res=[]
    for n in (1,2,4):
        with blas_threads(n):
            res.append(((x.T@x).copy(), (x.T@y).copy(), (x[:, :f//2].T @ y).copy()))
    for k in range(3):
        for j in (1,2):
            tot+=1
            if not np.array_equal(res[0][k],res[j][k]): bad+=1; print("differ",dt.__name__,r,f,o,k,j, np.abs(res[0][k]-res[j][k]).max())
print(bad,"of",tot,"differ")
