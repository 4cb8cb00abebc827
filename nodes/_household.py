"""A simulated Belgian household with PV, a battery and a smart meter, for the simulators.

One model drives the HomeWizard, Sungrow and DSMR simulators so that what they report
is physically consistent: a day-shaped PV curve with passing clouds, a household load
profile with appliance events, a battery that charges from surplus and covers load within
its SoC limits, and a grid connection that takes the rest:

    inverter_ac = pv - battery_charge + battery_discharge       (a lossless inverter)
    grid        = load - inverter_ac                             (+ import, - export)

Every counter is the integral of the same power the model reports, stepped at most one
simulated second at a time and split at 5-minute boundaries, so the counters agree with
the integrated power, the meter's quarter-hour values fall on clock quarters, the daily
counters reset at local midnight and the gas/water readings change every 5 minutes as a
DSMR 5 meter's do. Power is a pure function of simulated time and the seed (clouds and
appliance events come from per-day seeded schedules), so two runs with the same seed agree
however often they are sampled.

Time: simulated time runs `speed` times faster than real time from `start`; `speed: 0`
stops the clock, and `advance()` moves it explicitly (tests).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field

BRUSSELS = ZoneInfo("Europe/Brussels")
SEGMENT_S = 300  # counters of gas and water are published every 5 minutes
QUARTER_S = 900
EFFICIENCY = 0.95  # battery, each way

Pct = Annotated[float, Field(ge=0, le=100)]


class HouseholdConfig(BaseModel):
    """The simulated household; simulators with the same `name` share one model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        default="default", description="Simulators naming the same household share it."
    )
    speed: float = Field(
        default=1.0,
        ge=0,
        le=100_000,
        description="Simulated seconds per real second; 0 stops the clock.",
    )
    start: datetime | None = Field(default=None, description="Simulated start time; null: now.")
    seed: int = Field(
        default=1, description="Seeds clouds, appliance events and starting counters."
    )
    pv_peak_w: float = Field(default=4200, ge=0, description="PV array peak power (W).")
    battery_capacity_kwh: float = Field(default=9.6, ge=0, description="Usable battery capacity.")
    battery_max_w: float = Field(default=5000, ge=0, description="Battery charge/discharge limit.")
    soc_min_pct: Pct = Field(default=10, description="The battery does not discharge below this.")
    soc_max_pct: Pct = Field(default=100, description="The battery does not charge above this.")
    initial_soc_pct: Pct = Field(default=50, description="State of charge at the start.")
    phases: int = Field(default=3, ge=1, le=3, description="1 or 3 phase grid connection.")
    base_load_w: float = Field(default=220, ge=0, description="Always-on consumption.")
    gas_m3_per_winter_day: float = Field(
        default=9.0, ge=0, description="Heating gas on a cold day."
    )
    water_l_per_day: float = Field(default=280, ge=0, description="Water use per day.")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The household at one simulated instant (powers in W, energies in kWh, ts in UTC)."""

    ts: datetime
    pv_power_w: float
    mppt1_voltage_v: float
    mppt1_current_a: float
    mppt2_voltage_v: float
    mppt2_current_a: float
    load_power_w: float
    battery_power_w: float
    battery_soc_pct: float
    battery_soh_pct: float
    battery_temp_c: float
    battery_voltage_v: float
    battery_current_a: float
    inverter_ac_power_w: float
    grid_power_w: float
    power_l1_w: float
    power_l2_w: float
    power_l3_w: float
    voltage_l1_v: float
    voltage_l2_v: float
    voltage_l3_v: float
    current_l1_a: float
    current_l2_a: float
    current_l3_a: float
    frequency_hz: float
    tariff: int
    import_t1_kwh: float
    import_t2_kwh: float
    export_t1_kwh: float
    export_t2_kwh: float
    avg_15m_w: float
    monthly_peak_w: float
    monthly_peak_ts: datetime | None
    peak_history: tuple[tuple[datetime, datetime | None, float], ...]
    gas_m3: float
    gas_ts: datetime
    water_m3: float
    water_ts: datetime
    pv_daily_kwh: float
    pv_total_kwh: float
    battery_charge_daily_kwh: float
    battery_charge_total_kwh: float
    battery_discharge_daily_kwh: float
    battery_discharge_total_kwh: float
    inverter_output_daily_kwh: float
    inverter_output_total_kwh: float
    export_daily_kwh: float
    export_total_kwh: float
    import_daily_kwh: float
    import_total_kwh: float
    load_daily_kwh: float
    direct_consumption_daily_kwh: float
    direct_consumption_total_kwh: float
    inverter_temp_c: float
    running_state: str
    pv_generating: bool
    battery_charging: bool
    battery_discharging: bool
    exporting: bool
    importing: bool
    load_positive: bool


@dataclass(slots=True)
class _Event:
    start_s: float  # seconds after local midnight
    end_s: float
    power_w: float


@dataclass(slots=True)
class _Day:
    """What a local day looks like: sun, clouds, appliance events (seeded per day)."""

    midnight_utc: float
    end_utc: float  # the next local midnight (23, 24 or 25 hours later)
    sunrise_s: float  # seconds after local midnight
    daylength_s: float
    clear_sky: float  # fraction of pv_peak at noon without clouds
    cloud_phases: tuple[float, ...]
    cloud_periods_s: tuple[float, ...]
    cloudiness: float
    events: tuple[_Event, ...]
    weekday: bool
    heating: float  # 0 summer .. 1 midwinter


def _to_utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Household:
    """The integrating model; use `shared()` to get the one for a name."""

    def __init__(self, config: HouseholdConfig) -> None:
        self.config = config
        start = config.start or datetime.now(UTC)
        if start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
        self._t0_sim = start.timestamp()
        self._t0_real = time.monotonic()
        self._offset = 0.0  # added by advance()
        self.t = self._t0_sim  # how far the integration has got
        self._days: dict[date, _Day] = {}
        rnd = random.Random(config.seed)
        cap_wh = config.battery_capacity_kwh * 1000
        self.capacity_wh = cap_wh
        self.soc_wh = cap_wh * config.initial_soc_pct / 100
        # counters start where a household a few years in would be
        self.import_t1 = round(rnd.uniform(8000, 12000), 3)
        self.import_t2 = round(rnd.uniform(3000, 6000), 3)
        self.export_t1 = round(rnd.uniform(2000, 5000), 3)
        self.export_t2 = round(rnd.uniform(200, 800), 3)
        self.pv_total = round(rnd.uniform(10000, 16000), 1)
        self.charge_total = round(rnd.uniform(1500, 3000), 1)
        self.discharge_total = round(self.charge_total * 0.9, 1)
        self.output_total = round(self.pv_total * 0.97, 1)
        self.direct_total = round(self.pv_total * 0.35, 1)
        self.gas = round(rnd.uniform(2000, 6000), 3)
        self.water = round(rnd.uniform(300, 900), 3)
        self.daily = dict.fromkeys(
            ("pv", "charge", "discharge", "output", "export", "import", "load", "direct"), 0.0
        )
        self.temp_batt = 18.0
        # meter state
        self.quarter_import = 0.0  # kWh imported in the current clock quarter
        self.monthly_peak_w = 0.0
        self.monthly_peak_ts: float | None = None
        self.history = self._initial_history(rnd)
        self.gas_published = (self.gas, 0.0)
        self.water_published = (self.water, 0.0)
        self._last: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)
        self._local_cache: _Day | None = None
        seg_start = self.t - self.t % SEGMENT_S
        self.gas_published = (self.gas, seg_start)
        self.water_published = (self.water, seg_start)
        self.month_key = self._month_of(self.t)

    # clock ------------------------------------------------------------------------------

    def sim_time(self) -> float:
        elapsed = (time.monotonic() - self._t0_real) * self.config.speed
        return self._t0_sim + elapsed + self._offset

    def now(self) -> Snapshot:
        self._integrate_to(self.sim_time())
        return self.snapshot()

    def advance(self, seconds: float) -> Snapshot:
        self._offset += seconds
        return self.now()

    # the physics ------------------------------------------------------------------------

    def _day(self, local_day: date) -> _Day:
        day = self._days.get(local_day)
        if day is not None:
            return day
        cfg = self.config
        rnd = random.Random(f"{cfg.seed}-{local_day.isoformat()}")
        doy = local_day.timetuple().tm_yday
        season = math.sin(2 * math.pi * (doy - 80) / 365)  # +1 midsummer, -1 midwinter
        midnight = datetime(local_day.year, local_day.month, local_day.day, tzinfo=BRUSSELS)
        daylength_h = 12.2 + 4.2 * season
        # solar noon in Brussels is about 11:43 UTC; in local seconds after midnight:
        utc_offset_s = midnight.utcoffset().total_seconds()  # type: ignore[union-attr]
        noon_local_s = 11.72 * 3600 + utc_offset_s
        weekday = local_day.weekday() < 5
        events = [
            _Event(rnd.uniform(6.5, 7.5) * 3600, 0, 2000),  # kettle
            _Event(rnd.uniform(17.5, 18.2) * 3600, 0, 1800),  # cooking
            _Event(rnd.uniform(12.0, 12.5) * 3600, 0, 1200),  # lunch / microwave
        ]
        events[0].end_s = events[0].start_s + 180
        events[1].end_s = events[1].start_s + 3600
        events[2].end_s = events[2].start_s + 420
        if rnd.random() < 0.5:  # washing machine, then its spin phase
            wm = rnd.uniform(9, 15) * 3600
            events += [_Event(wm, wm + 1200, 2000), _Event(wm + 1200, wm + 4800, 250)]
        if rnd.random() < 0.6:  # dishwasher after dinner
            dw = rnd.uniform(19.5, 21.5) * 3600
            events += [_Event(dw, dw + 1800, 1900), _Event(dw + 1800, dw + 5400, 150)]
        nxt = local_day + timedelta(days=1)
        day = _Day(
            midnight_utc=midnight.timestamp(),
            end_utc=datetime(nxt.year, nxt.month, nxt.day, tzinfo=BRUSSELS).timestamp(),
            sunrise_s=noon_local_s - daylength_h * 1800,
            daylength_s=daylength_h * 3600,
            clear_sky=0.55 + 0.3 * season,
            cloud_phases=tuple(rnd.uniform(0, 2 * math.pi) for _ in range(3)),
            cloud_periods_s=tuple(rnd.uniform(600, 5400) for _ in range(3)),
            cloudiness=rnd.choice((0.05, 0.2, 0.45, 0.7)),
            events=tuple(events),
            weekday=weekday,
            heating=max(0.0, -season * 0.8 + 0.25),
        )
        self._days[local_day] = day
        return day

    def _local(self, t: float) -> tuple[float, float, _Day]:
        """(seconds after local midnight, local midnight in UTC seconds, the day) for t."""
        day = self._local_cache
        if day is None or not day.midnight_utc <= t < day.end_utc:
            day = self._day(datetime.fromtimestamp(t, BRUSSELS).date())
            self._local_cache = day
        return t - day.midnight_utc, day.midnight_utc, day

    def pv_w(self, t: float) -> float:
        s, _, day = self._local(t)
        x = (s - day.sunrise_s) / day.daylength_s
        if not 0 < x < 1:
            return 0.0
        sun: float = math.sin(math.pi * x) ** 1.3
        wave = sum(
            math.sin(2 * math.pi * t / p + ph)
            for p, ph in zip(day.cloud_periods_s, day.cloud_phases, strict=True)
        )
        clouds = 1 - day.cloudiness * (0.5 + wave / 6)  # wave in [-3, 3] -> [0, 1]
        return max(0.0, self.config.pv_peak_w * day.clear_sky * sun * clouds)

    def load_w(self, t: float) -> float:
        s, _, day = self._local(t)
        h = s / 3600
        w = self.config.base_load_w
        w += 90 if (t // 1200) % 3 == 0 else 0  # the fridge's compressor cycle
        if day.weekday and 6.5 <= h < 8:
            w += 350
        if 18.5 <= h < 23:
            w += 280  # lights, TV
        for ev in day.events:
            if ev.start_s <= s < ev.end_s:
                w += ev.power_w
        return w

    def _gas_rate_m3_s(self, t: float) -> float:
        s, _, day = self._local(t)
        h = s / 3600
        profile = 1.6 if 6 <= h < 9 or 17 <= h < 22 else (0.3 if h < 6 else 0.9)
        per_day = self.config.gas_m3_per_winter_day * day.heating + 0.15  # + cooking, hot water
        return per_day * profile / 86400

    def _water_rate_l_s(self, t: float) -> float:
        s, _, _day = self._local(t)
        h = s / 3600
        if 7.0 <= h < 7.15:  # a shower
            return 8 / 60
        daytime = 7 <= h < 23
        return (self.config.water_l_per_day * 0.55 / 86400 / (16 / 24)) if daytime else 0.0

    def _battery(self, surplus_w: float, dt: float) -> tuple[float, float]:
        """(charge W, discharge W) for a step, within power and SoC limits."""
        cfg = self.config
        if self.capacity_wh <= 0:
            return 0.0, 0.0
        hi = self.capacity_wh * cfg.soc_max_pct / 100
        lo = self.capacity_wh * cfg.soc_min_pct / 100
        # the limits count the losses, so the SoC lands on its bound, never past it
        if surplus_w > 0:
            room_w = max(0.0, hi - self.soc_wh) / EFFICIENCY * 3600 / dt
            return min(surplus_w, cfg.battery_max_w, room_w), 0.0
        avail_w = max(0.0, self.soc_wh - lo) * EFFICIENCY * 3600 / dt
        return 0.0, min(-surplus_w, cfg.battery_max_w, avail_w)

    def _integrate_to(self, target: float) -> None:
        while self.t < target - 1e-9:
            seg_end = (self.t // SEGMENT_S + 1) * SEGMENT_S
            end = min(target, seg_end)
            while self.t < end - 1e-9:
                dt = min(1.0, end - self.t)
                self._step(self.t + dt / 2, dt)  # midpoint: counters match sampled power
                self.t += dt
            if abs(self.t - seg_end) < 1e-6:
                self.t = seg_end
                self._segment_boundary(seg_end)

    def _step(self, t: float, dt: float) -> None:
        pv = self.pv_w(t)
        load = self.load_w(t)
        charge, discharge = self._battery(pv - load, dt)
        self.soc_wh += (charge * EFFICIENCY - discharge / EFFICIENCY) * dt / 3600
        inverter_ac = pv - charge + discharge
        grid = load - inverter_ac
        kwh = dt / 3_600_000
        _, _, day = self._local(t)
        s = t - day.midnight_utc
        day_tariff = day.weekday and 7 * 3600 <= s < 22 * 3600
        imp, exp = max(grid, 0.0) * kwh, max(-grid, 0.0) * kwh
        if day_tariff:
            self.import_t1 += imp
            self.export_t1 += exp
        else:
            self.import_t2 += imp
            self.export_t2 += exp
        self.quarter_import += imp
        d = self.daily
        d["pv"] += pv * kwh
        d["charge"] += charge * kwh
        d["discharge"] += discharge * kwh
        d["output"] += max(inverter_ac, 0.0) * kwh
        d["export"] += exp
        d["import"] += imp
        d["load"] += load * kwh
        d["direct"] += min(pv, load) * kwh
        self.pv_total += pv * kwh
        self.charge_total += charge * kwh
        self.discharge_total += discharge * kwh
        self.output_total += max(inverter_ac, 0.0) * kwh
        self.direct_total += min(pv, load) * kwh
        self.gas += self._gas_rate_m3_s(t) * dt
        self.water += self._water_rate_l_s(t) * dt / 1000
        heat = abs(charge - discharge) / max(self.config.battery_max_w, 1.0)
        self.temp_batt += (18 + 9 * heat - self.temp_batt) * min(1.0, dt / 600)
        self._last = (pv, load, charge, discharge, t)

    def _segment_boundary(self, t: float) -> None:
        self.gas_published = (self.gas, t)
        self.water_published = (self.water, t)
        if t % QUARTER_S == 0:
            q_power = self.quarter_import * 4000  # kWh in a quarter x 4 = kW; in W
            if q_power > self.monthly_peak_w:
                self.monthly_peak_w = q_power
                self.monthly_peak_ts = t
            self.quarter_import = 0.0
        s, _, _ = self._local(t)
        if abs(s) < 1e-6:  # local midnight (a DST day has 23 or 25 hours, not 86400 s)
            self.daily = dict.fromkeys(self.daily, 0.0)
        month = self._month_of(t)
        if month != self.month_key:
            start = datetime(month[0], month[1], 1, tzinfo=BRUSSELS)
            prev = (start - timedelta(days=1)).replace(day=1)
            peak_ts = _to_utc(self.monthly_peak_ts) if self.monthly_peak_ts else None
            entry = (prev.astimezone(UTC), peak_ts, round(self.monthly_peak_w / 1000, 3))
            self.history = (entry, *self.history)[:13]
            self.monthly_peak_w = 0.0
            self.monthly_peak_ts = None
            self.month_key = month

    @staticmethod
    def _month_of(t: float) -> tuple[int, int]:
        local = datetime.fromtimestamp(t, BRUSSELS)
        return local.year, local.month

    def _initial_history(
        self, rnd: random.Random
    ) -> tuple[tuple[datetime, datetime | None, float], ...]:
        """The meter's 13-month peak history before the simulation starts (seeded)."""
        local = datetime.fromtimestamp(self._t0_sim, BRUSSELS)
        month_start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        out: list[tuple[datetime, datetime | None, float]] = []
        for _ in range(13):
            month_start = (month_start - timedelta(days=1)).replace(day=1)
            peak_at = month_start + timedelta(
                days=rnd.randint(0, 26), hours=rnd.choice((7, 8, 18, 19))
            )
            out.append(
                (
                    month_start.astimezone(UTC),
                    peak_at.astimezone(UTC),
                    round(rnd.uniform(2.0, 6.5), 3),
                )
            )
        return tuple(out)

    # what the devices see ---------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        cfg = self.config
        t = self.t
        pv = self.pv_w(t)
        load = self.load_w(t)
        charge, discharge = self._battery(pv - load, 1.0)
        battery = charge - discharge
        inverter_ac = pv - charge + discharge
        grid = load - inverter_ac
        _, _, day = self._local(t)
        s = t - day.midnight_utc
        tariff = 1 if day.weekday and 7 * 3600 <= s < 22 * 3600 else 2
        # phases: the house's circuits are unevenly loaded; a 3-phase inverter feeds evenly
        shares = (0.45, 0.30, 0.25) if cfg.phases == 3 else (1.0, 0.0, 0.0)
        inv_shares = (1 / 3, 1 / 3, 1 / 3) if cfg.phases == 3 else (1.0, 0.0, 0.0)
        phase_w = [load * a - inverter_ac * b for a, b in zip(shares, inv_shares, strict=True)]
        volts = [
            (230.0 + 2.5 * math.sin(t / 700 + k) - 0.0015 * p)
            if (k == 0 or cfg.phases == 3)
            else 0.0
            for k, p in enumerate(phase_w)
        ]
        amps = [p / v if v else 0.0 for p, v in zip(phase_w, volts, strict=True)]
        quarter_elapsed = t % QUARTER_S
        avg = self.quarter_import * 3_600_000 / quarter_elapsed if quarter_elapsed > 0 else 0.0
        irr = pv / cfg.pv_peak_w if cfg.pv_peak_w else 0.0
        mppt_v = (300 + 60 * math.sqrt(irr)) if pv > 0 else 0.0
        batt_v = (
            320 + 0.5 * (100 * self.soc_wh / self.capacity_wh - 50) if self.capacity_wh else 0.0
        )
        d = self.daily
        return Snapshot(
            ts=_to_utc(t),
            pv_power_w=pv,
            mppt1_voltage_v=mppt_v,
            mppt1_current_a=pv * 0.55 / mppt_v if mppt_v else 0.0,
            mppt2_voltage_v=mppt_v * 0.97 if mppt_v else 0.0,
            mppt2_current_a=pv * 0.45 / (mppt_v * 0.97) if mppt_v else 0.0,
            load_power_w=load,
            battery_power_w=battery,
            battery_soc_pct=100 * self.soc_wh / self.capacity_wh if self.capacity_wh else 0.0,
            battery_soh_pct=98.7,
            battery_temp_c=self.temp_batt,
            battery_voltage_v=batt_v,
            battery_current_a=battery / batt_v if batt_v else 0.0,
            inverter_ac_power_w=inverter_ac,
            grid_power_w=grid,
            power_l1_w=phase_w[0],
            power_l2_w=phase_w[1],
            power_l3_w=phase_w[2],
            voltage_l1_v=volts[0],
            voltage_l2_v=volts[1],
            voltage_l3_v=volts[2],
            current_l1_a=amps[0],
            current_l2_a=amps[1],
            current_l3_a=amps[2],
            frequency_hz=50.0 + 0.02 * math.sin(t / 97),
            tariff=tariff,
            import_t1_kwh=self.import_t1,
            import_t2_kwh=self.import_t2,
            export_t1_kwh=self.export_t1,
            export_t2_kwh=self.export_t2,
            avg_15m_w=avg,
            monthly_peak_w=self.monthly_peak_w,
            monthly_peak_ts=_to_utc(self.monthly_peak_ts) if self.monthly_peak_ts else None,
            peak_history=self.history,
            gas_m3=self.gas_published[0],
            gas_ts=_to_utc(self.gas_published[1]),
            water_m3=self.water_published[0],
            water_ts=_to_utc(self.water_published[1]),
            pv_daily_kwh=d["pv"],
            pv_total_kwh=self.pv_total,
            battery_charge_daily_kwh=d["charge"],
            battery_charge_total_kwh=self.charge_total,
            battery_discharge_daily_kwh=d["discharge"],
            battery_discharge_total_kwh=self.discharge_total,
            inverter_output_daily_kwh=d["output"],
            inverter_output_total_kwh=self.output_total,
            export_daily_kwh=d["export"],
            export_total_kwh=self.export_t1 + self.export_t2,
            import_daily_kwh=d["import"],
            import_total_kwh=self.import_t1 + self.import_t2,
            load_daily_kwh=d["load"],
            direct_consumption_daily_kwh=d["direct"],
            direct_consumption_total_kwh=self.direct_total,
            inverter_temp_c=28 + 18 * abs(inverter_ac) / max(cfg.pv_peak_w, 1.0),
            running_state="running" if pv > 0 or battery != 0 else "standby",
            pv_generating=pv > 0,
            battery_charging=battery > 0,
            battery_discharging=battery < 0,
            exporting=grid < 0,
            importing=grid > 0,
            load_positive=load > 0,
        )


_SHARED: dict[str, Household] = {}


def shared(config: HouseholdConfig) -> Household:
    """The one model of this name in the process; a changed config starts a new one."""
    model = _SHARED.get(config.name)
    if model is None or model.config != config:
        model = Household(config)
        _SHARED[config.name] = model
    return model
