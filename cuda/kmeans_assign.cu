// k-means assignment for the clustering pass (compress/kmeans.py `nearest`): for each value of each
// table row, the index of the nearest centroid. Centroids of a row are sorted, so the nearest one is
// found by binary search over the midpoints between neighbours (ties go to the lower centroid, as
// torch.searchsorted(mids, v) does). One block per table row; the row's midpoints sit in shared memory.

#include "common.cuh"

extern "C" __global__ void kmeans_assign(const float* __restrict__ values,     // [T, n]
                                         const float* __restrict__ centroids,  // [T, k], sorted per row
                                         uint8_t* __restrict__ codes,          // [T, n]
                                         int n, int k) {
    __shared__ float mids[255];
    int t = blockIdx.y;
    const float* c = centroids + (size_t)t * k;
    for (int i = threadIdx.x; i < k - 1; i += blockDim.x) mids[i] = 0.5f * (c[i] + c[i + 1]);
    __syncthreads();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float v = values[(size_t)t * n + i];
        int lo = 0, hi = k - 1;  // first midpoint >= v (searchsorted, side=left)
        while (lo < hi) {
            int mid = (lo + hi) >> 1;
            if (mids[mid] < v) lo = mid + 1; else hi = mid;
        }
        codes[(size_t)t * n + i] = (uint8_t)lo;
    }
}
