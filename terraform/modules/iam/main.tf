# One role per tier, each with only what that tier does: the routers write code artifacts; the
# GPU nodes read code and read and write snapshots; every tier reads its own secrets; nothing
# else touches the bucket. Sessions come through SSM, never SSH.

locals {
  tiers     = ["router", "scheduler", "billing", "gpu_node", "nats"]
  code      = "arn:aws:s3:::${var.bucket}/${var.prefix}/code/*"
  snapshots = "arn:aws:s3:::${var.bucket}/${var.prefix}/snapshots/*"
  s3 = {
    router = [
      { actions = ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"], resources = [local.code] },
    ]
    gpu_node = [
      { actions = ["s3:GetObject"], resources = [local.code] },
      {
        actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
        resources = [local.snapshots]
      },
    ]
  }
}

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "tier" {
  for_each           = toset(local.tiers)
  name               = "${var.name}-${replace(each.key, "_", "-")}"
  assume_role_policy = data.aws_iam_policy_document.assume.json
}

resource "aws_iam_instance_profile" "tier" {
  for_each = aws_iam_role.tier
  name     = each.value.name
  role     = each.value.name
}

resource "aws_iam_role_policy_attachment" "ssm" {
  for_each   = aws_iam_role.tier
  role       = each.value.name
  policy_arn = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

data "aws_iam_policy_document" "tier" {
  for_each = toset(local.tiers)

  statement {
    sid       = "OwnSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = var.secret_arns[each.key]
  }

  dynamic "statement" {
    for_each = lookup(local.s3, each.key, [])
    content {
      actions   = statement.value.actions
      resources = statement.value.resources
    }
  }

  # Listing the bucket (Kiln's own) is what makes S3 answer 404 rather than 403 for a key
  # that is not there: how a store tells "not yet uploaded" from "not allowed".
  dynamic "statement" {
    for_each = contains(keys(local.s3), each.key) ? [1] : []
    content {
      sid       = "ListTheBucket"
      actions   = ["s3:ListBucket"]
      resources = ["arn:aws:s3:::${var.bucket}"]
    }
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [1]
    content {
      sid       = "BucketKey"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [var.kms_key_arn]
    }
  }

  # A GPU node finishes its own termination hook once its replicas have drained.
  dynamic "statement" {
    for_each = each.key == "gpu_node" ? [1] : []
    content {
      sid       = "DrainThenGo"
      actions   = ["autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat"]
      resources = ["arn:aws:autoscaling:*:*:autoScalingGroup:*:autoScalingGroupName/${var.name}-gpu-*"]
    }
  }
}

resource "aws_iam_role_policy" "tier" {
  for_each = aws_iam_role.tier
  name     = "kiln-${each.key}"
  role     = each.value.name
  policy   = data.aws_iam_policy_document.tier[each.key].json
}
