"""Real tegrastats lines printed by Jetson devices, copied verbatim from
/work/shared/fixtures/tegrastats-orin.md (each line's public source is named there)."""

from __future__ import annotations

# JetPack 5 (L4T R35), AGX Orin 64 GB, idle, MAXN: six rails incl. two NC (public project README).
JP5_IDLE = (
    "04-24-2023 00:01:24 RAM 1282/62795MB (lfb 15152x4MB) SWAP 0/31398MB (cached 0MB) CPU "
    "[0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] "
    "EMC_FREQ 0%@2133 GR3D_FREQ 0%@0 GR3D2_FREQ 0%@0 VIC_FREQ 729 APE 174 CV0@-256C "
    "CPU@42.593C Tboard@32C SOC2@39.343C Tdiode@33.25C SOC0@39.375C CV1@-256C GPU@-256C "
    "tj@42.593C SOC1@40.468C CV2@-256C VDD_GPU_SOC 2399mW/2399mW VDD_CPU_CV 400mW/400mW "
    "VIN_SYS_5V0 4032mW/4032mW NC 0mW/0mW VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW"
)
# JetPack 5.x under load (MAXN, DLA active; NC entries gone), partial line (public README).
JP5_LOAD = (
    "... EMC_FREQ 1%@2133 GR3D_FREQ 14%@[407,407] VIC_FREQ 115 NVDLA0_FREQ @1600 APE 174 "
    "CV0@73.625C CPU@77.281C Tboard@62C SOC2@70C Tdiode@62.25C SOC0@69.531C CV1@72.5C "
    "GPU@69.125C tj@77.281C SOC1@68.968C CV2@67.25C VDD_GPU_SOC 3150mW/2971mW "
    "VDD_CPU_CV 14312mW/12415mW VIN_SYS_5V0 4968mW/5048mW VDDQ_VDD2_1V8AO 1091mW/1091mW"
)
# JetPack 6 (L4T R36.4.4), AGX Orin 64 GB, as root: only three rails (OpenTelemetry test data).
JP6_ROOT = (
    "05-09-2026 18:42:06 RAM 18207/62841MB (lfb 466x4MB) SWAP 86/31420MB (cached 0MB) CPU "
    "[14%@2188,5%@2112,8%@2035,14%@2201,46%@1267,47%@1267,2%@1267,10%@1267,4%@1036,5%@1036,"
    "6%@1036,10%@1036] EMC_FREQ 3%@2133 GR3D_FREQ 0%@[0,0] NVENC 79%@166 NVDEC off NVJPG off "
    "NVJPG1 off VIC 36%@115 OFA off NVDLA0 off NVDLA1 off PVA0_FREQ off APE 174 cpu@52.562C "
    "soc2@48.437C soc0@49.093C tj@52.562C soc1@49.656C VDD_GPU_SOC 2412mW/2412mW "
    "VDD_CPU_CV 1607mW/1607mW VIN_SYS_5V0 4707mW/4707mW"
)
# JetPack 6, MAXN idle, without root: no EMC_FREQ, no GR3D clock (public audit document).
JP6_USER = (
    "10-05-2026 21:03:35 RAM 5137/62841MB (lfb 2x4MB) SWAP 0/31420MB (cached 0MB) CPU "
    "[1%@729,25%@729,1%@729,1%@729,2%@729,1%@729,0%@729,0%@729,2%@729,14%@729,1%@729,0%@729] "
    "GR3D_FREQ 0% cpu@52.875C soc2@48.656C soc0@49.062C tj@52.875C soc1@49.031C "
    "VDD_GPU_SOC 3178mW/3178mW VDD_CPU_CV 794mW/794mW VIN_SYS_5V0 4543mW/4543mW"
)
# JetPack 7.2 (L4T R39.2), AGX Orin 64 GB: triple-valued power (jetson_stats test_06_tegra_parse).
JP7 = (
    "07-25-2026 09:08:28 RAM 20642/62817MB (lfb 1x2MB) CPU [23%@2201,...,27%@2201] "
    "EMC_FREQ 3%@3199 GR3D_FREQ 12%@[1300,1300] NVENC0 off ... APE 174 cpu@52.968C/52.968C "
    "soc2@48.406C/48.406C soc0@49.531C/49.531C gpu@47.625C/47.625C "
    "VDD_GPU_SOC 5139mW/5139mW/5139mW VDD_CPU_CV 3268mW/3268mW/3268mW "
    "VIN_SYS_5V0 5500mW/5500mW/5500mW"
)
# Orin NX / Nano fragment: the total input rail is VDD_IN (public test fixture).
ORIN_NX = "VDD_IN 4542mW/4000mW VDD_CPU_GPU_CV 495mW/400mW VDD_SOC 1286mW/1200mW"
