// Peak multiply-accumulate throughput of the instruction sequences onnxruntime's MLAS uses on x86-64
// with AVX2 and no VNNI (issue 18, docs/decisions/quantization.md), in registers (no memory), 12
// independent accumulators, best of 7 rounds of process CPU time:
//   fp32: vfmadd231ps                          8 MACs per instruction
//   u8s8: vpmaddubsw, vpmaddwd (x ones), vpaddd 32 MACs per triple   (MlasGemmU8S8KernelAvx2, ConvSymKernelAvx2)
//   u8u8: vpmaddwd, vpaddd                      16 MACs per pair     (MlasGemmU8U8KernelAvx2)
//   depthwise: the same pair on bytes widened to 32-bit lanes, 8 MACs (MlasConvSymDepthwiseKernelAvx2)
#include <stdio.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_PROCESS_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define N 20000000L
#define R12(X) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define FMA(i) "vfmadd231ps %%ymm1, %%ymm0, %%ymm" #i "\n\t"
#define SU(i) "vpmaddubsw %%ymm1, %%ymm0, %%ymm2\n\tvpmaddwd %%ymm3, %%ymm2, %%ymm2\n\tvpaddd %%ymm2, %%ymm" #i ", %%ymm" #i "\n\t"
#define UU(i) "vpmaddwd %%ymm1, %%ymm0, %%ymm2\n\tvpaddd %%ymm2, %%ymm" #i ", %%ymm" #i "\n\t"
static double run_fma(void){double t=now();long n=N;
  __asm__ volatile("1:\n\t" R12(FMA) "dec %0\n\tjnz 1b" : "+r"(n) :: "memory");
  return now()-t;}
static double run_su(void){double t=now();long n=N;
  __asm__ volatile("1:\n\t" R12(SU) "dec %0\n\tjnz 1b" : "+r"(n) :: "memory");
  return now()-t;}
static double run_uu(void){double t=now();long n=N;
  __asm__ volatile("1:\n\t" R12(UU) "dec %0\n\tjnz 1b" : "+r"(n) :: "memory");
  return now()-t;}
//
//   gcc -O2 -o /tmp/int8_peak tools/int8_peak.c && /tmp/int8_peak
int main(void){
  double f=1e9,s=1e9,u=1e9;
  for(int r=0;r<7;r++){double x;
    x=run_fma(); if(x<f)f=x; x=run_su(); if(x<s)s=x; x=run_uu(); if(x<u)u=x;}
  double n=12.0*N;
  printf("instructions/s: fma %.3g, u8s8 triples %.3g, u8u8 pairs %.3g\n", n/f, n/s, n/u);
  printf("MAC/s: fp32 %.3g | u8s8 %.3g = %.2fx fp32 | u8u8 %.3g = %.2fx fp32 | depthwise int8 %.3g = %.2fx fp32\n",
         n*8/f, n*32/s, (n*32/s)/(n*8/f), n*16/u, (n*16/u)/(n*8/f), n*8/u, (n*8/u)/(n*8/f));
  return 0;
}
