"""The exact global trial budget, shared by every worker of a study through its database.

Before a trial starts, its worker reserves a slot with one conditional UPDATE (`reserved < budget`) on a
small table beside Optuna's. A trial that ends FAIL gives its slot back, so exactly `budget` trials finish
(COMPLETE or PRUNED), however many workers race.
"""

from __future__ import annotations

from adsearch.search.database import configure_sqlite, created_concurrently, engine_kwargs
from adsearch.search.errors import StudyError

# Far beyond any study (a trial takes a second or more), and inside every database's 32-bit integer.
MAX_TRIALS = 1_000_000


def check_budget(budget: int) -> int:
    if not 1 <= budget <= MAX_TRIALS:
        raise StudyError(f"--trials {budget}: give 1 to {MAX_TRIALS:,} finished trials")
    return budget


class TrialBudget:
    """The global budget: `reserved` slots out of `budget`, kept in one row per study."""

    def __init__(self, url: str, study_name: str):
        import sqlalchemy as sa

        self.study_name = study_name
        self.engine = sa.create_engine(url, **engine_kwargs(url))
        if self.engine.name == "sqlite":
            configure_sqlite(self.engine)
        self.table = sa.Table(
            "adsearch_budget", sa.MetaData(),
            sa.Column("study_name", sa.String(512), primary_key=True),
            sa.Column("budget", sa.Integer, nullable=False),
            sa.Column("reserved", sa.Integer, nullable=False),
        )
        try:
            self.table.create(self.engine, checkfirst=True)
        except sa.exc.SQLAlchemyError as exc:  # another process created it between the check and the create
            if not created_concurrently(exc):
                raise

    def set(self, budget: int, reserved: int) -> None:
        import sqlalchemy as sa

        with self.engine.begin() as db:
            updated = db.execute(sa.update(self.table).where(self.table.c.study_name == self.study_name)
                                 .values(budget=budget, reserved=reserved)).rowcount
            if not updated:
                db.execute(sa.insert(self.table).values(study_name=self.study_name, budget=budget,
                                                        reserved=reserved))

    def get(self) -> tuple[int, int]:
        import sqlalchemy as sa

        with self.engine.connect() as db:
            row = db.execute(sa.select(self.table.c.budget, self.table.c.reserved)
                             .where(self.table.c.study_name == self.study_name)).first()
        if row is None:
            raise StudyError(f"study {self.study_name!r} has no budget; start it with `adsearch search`")
        return int(row[0]), int(row[1])

    def reserve(self) -> bool:
        import sqlalchemy as sa

        t = self.table
        with self.engine.begin() as db:
            return db.execute(sa.update(t).where(t.c.study_name == self.study_name, t.c.reserved < t.c.budget)
                              .values(reserved=t.c.reserved + 1)).rowcount == 1

    def release(self) -> None:
        import sqlalchemy as sa

        t = self.table
        with self.engine.begin() as db:
            db.execute(sa.update(t).where(t.c.study_name == self.study_name, t.c.reserved > 0)
                       .values(reserved=t.c.reserved - 1))

    def reconcile(self, expected_reserved: int, holders: int) -> bool:
        """Reset `reserved` to the trials that hold a slot, if nobody changed it meanwhile."""
        import sqlalchemy as sa

        t = self.table
        with self.engine.begin() as db:
            return db.execute(sa.update(t).where(t.c.study_name == self.study_name,
                                                 t.c.reserved == expected_reserved)
                              .values(reserved=holders)).rowcount == 1
